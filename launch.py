"""transfer-engine entry point.

    python launch.py --flagfile=configs/frozen.flags [--flag=value ...]
    transfer-engine --flagfile=configs/frozen.flags [--flag=value ...]   # installed: the same

Parses flags into one validated Config, runs the job, and turns the errors a user should read
(errors.RunError: bad input, divergence, a failed mode of --job=compare) into one line on stderr and
their exit status (errors.py has the table), without a traceback. Anything else is a bug in this
project and keeps its traceback (exit status 1).
"""

import sys
import textwrap

# Flags are defined, parsed and validated before TensorFlow loads (main imports it): --help, a misspelt flag
# and a bad value answer at once. Nothing imported here loads it (tests/test_docs.py checks).
from transfer_engine import startup  # First: TensorFlow's process defaults.
from absl import app, flags

from transfer_engine import errors
from transfer_engine.engine import config as config_lib

config_lib.define_flags()
startup.resolve_flagfiles(flags.FLAGS, config_lib.shipped)  # configs/*.flags from any directory, once installed.
flags.adopt_module_key_flags(config_lib)  # So --help lists them.


def fail(message):
    """Bad input on the command line itself: one line, exit status 2 (absl's parser exits here)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)


HELP = ("-h", "-help", "--help", "--helpshort", "-?")
USAGE = """transfer-engine: trains image classifiers by transfer learning (README.md says how).

    transfer-engine --flagfile=configs/frozen.flags [--flag=value ...]   (installed)
    python launch.py --flagfile=configs/frozen.flags [--flag=value ...]  (in a checkout)

Later flags override earlier ones and the flagfile's."""
MORE = """Also: --flagfile=FILE reads flags from FILE, one per line; --verbosity=0 lets every library's INFO lines
into the log (TF_CPP_MIN_LOG_LEVEL=0 TensorFlow's C++ ones too); --helpfull lists absl's own flags as well."""


def help_text(width=100):
    """--help: every engine flag with its default, grouped as config.FLAG_GROUPS (and docs/flags.md) group them."""
    lines = [USAGE]
    for title, page, names in config_lib.FLAG_GROUPS:
        lines += ["", f"{title} (docs/{page}):"]
        for name in names:
            default = config_lib.default_text(name)
            lines.append(f"  --{name}" + (f"={default}" if default else ""))
            lines += textwrap.wrap(config_lib.help_text(name), width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines + ["", MORE]) + "\n"


def parse_flags(argv):
    if any(arg in HELP for arg in argv[1:]):
        sys.stdout.write(help_text())
        sys.exit(errors.EXIT_DONE)
    if "--helpfull" in argv[1:]:  # absl's own answer exits 1, as if it were an error.
        sys.stdout.write(help_text() + "\nEvery flag, absl's too:\n" + flags.FLAGS.get_help() + "\n")
        sys.exit(errors.EXIT_DONE)
    try:
        return config_lib.parse_args(argv, flags.FLAGS)
    except errors.UsageError as error:
        fail(error)


def main(argv):
    """Runs the job of the parsed flags; returns the exit status."""
    if len(argv) > 1:
        fail(f"unexpected argument {argv[1]!r} (flags look like --name=value)")
    try:
        config = config_lib.from_flags()  # Before TensorFlow loads: a bad value answers at once.
        from transfer_engine import internals  # Loads TensorFlow.
        from transfer_engine.engine import jobs

        internals.configure_logging(everything=flags.FLAGS["verbosity"].present)
        jobs.run(config)
    except errors.RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except Exception as error:  # A full disk is the machine's state, not a bug: one line, like bad input.
        from transfer_engine import internals

        path = internals.full_disk_path(error)
        if path is None:
            raise
        print(f"error: no space left on the device writing {path or flags.FLAGS.model_dir}: free space, then rerun "
              "the same command (it resumes from the last checkpoint)", file=sys.stderr)
        return errors.EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C outside training, or twice: nothing more is saved.
        print("\nerror: interrupted (Ctrl-C); rerunning the same command resumes from the last checkpoint",
              file=sys.stderr)
        return errors.EXIT_INTERRUPTED
    return errors.EXIT_DONE


def run():
    """The `transfer-engine` console command: `python launch.py` from anywhere."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()

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

from transfer_engine import internals  # First: it sets TensorFlow's process defaults, then loads TensorFlow.
from absl import app, flags

from transfer_engine import errors
from transfer_engine.engine import config as config_lib
from transfer_engine.engine import jobs

config_lib.define_flags()
internals.resolve_flagfiles(flags.FLAGS, config_lib.shipped)  # configs/*.flags from any directory, once installed.
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
    """--help: every engine flag with its default, grouped as config.FLAG_GROUPS (and README.md) group them."""
    lines = [USAGE]
    for title, names in config_lib.FLAG_GROUPS:
        lines += ["", f"{title}:"]
        for name in names:
            flag = flags.FLAGS[name]
            default = flag.default
            if isinstance(default, list):
                default = ",".join(map(str, default))
            elif isinstance(default, bool):
                default = str(default).lower()
            lines.append(f"  --{name}" + (f"={default}" if default not in (None, "") else ""))
            lines += textwrap.wrap(flag.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines + ["", MORE]) + "\n"


def parse_flags(argv):
    if any(arg in HELP for arg in argv[1:]):
        sys.stdout.write(help_text())
        sys.exit(errors.EXIT_DONE)
    try:
        return config_lib.parse_args(argv, flags.FLAGS)
    except errors.UsageError as error:
        fail(error)


def main(argv):
    """Runs the job of the parsed flags; returns the exit status."""
    if len(argv) > 1:
        fail(f"unexpected argument {argv[1]!r} (flags look like --name=value)")
    internals.configure_logging(everything=flags.FLAGS["verbosity"].present)
    try:
        jobs.run(config_lib.from_flags())
    except errors.RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_status
    except Exception as error:  # A full disk is the machine's state, not a bug: one line, like bad input.
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

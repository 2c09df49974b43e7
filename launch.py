"""transfer-engine entry point.

    python launch.py --flagfile=configs/frozen.flags [--flag=value ...]

Parses flags into one validated Config, runs the job, and turns the errors a user should read
(errors.RunError: bad input, divergence, a failed mode of --job=compare) into one line on stderr and
their exit status (errors.py has the table), without a traceback. Anything else is a bug in this
project and keeps its traceback (exit status 1).
"""

import logging as std_logging
import os
import sys
import textwrap
import warnings

import internals  # First: it sets TensorFlow's process defaults, then loads TensorFlow.
from absl import app, flags, logging
import tensorflow as tf

import errors
from engine import config as config_lib
from engine import distribute, jobs

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # So --help lists them.
ROOT = os.path.dirname(os.path.abspath(__file__))
# Where this project's modules are: its top-level modules and its packages (setup.cfg's), no deeper.
PROJECT_DIRS = frozenset([ROOT] + [os.path.join(ROOT, package) for package in ("engine", "models", "data")])


def _from_this_project(record):
    """Keeps WARNING and above from anyone, INFO from this project's modules only: absl logs every
    library's lines through one logger, so the file a line comes from is what tells them apart (not a
    path prefix: a virtualenv at /x/repo-venv or /x/repo/venv is not the project at /x/repo)."""
    return record.levelno >= std_logging.WARNING or os.path.dirname(os.path.abspath(record.pathname)) in PROJECT_DIRS


def configure_logging(everything=False):
    """Time-stamped INFO lines from this project; libraries only speak up from WARNING. With absl's
    --verbosity given (`everything`), its level holds for every library's lines."""
    handler = logging.get_absl_handler().python_handler
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if everything:
        handler.removeFilter(_from_this_project)
        tf.get_logger().setLevel(std_logging.NOTSET)
    else:
        logging.set_verbosity(logging.INFO)
        if _from_this_project not in handler.filters:
            handler.addFilter(_from_this_project)
        tf.get_logger().setLevel("WARNING")
    # TensorFlow's Python logger writes through a handler of its own and passes each line on to absl's
    # too: every TensorFlow warning came out twice. Absl's handler alone writes them, time-stamped.
    for own in list(tf.get_logger().handlers):
        tf.get_logger().removeHandler(own)
    internals.quiet_deprecations()
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")


def fail(message):
    """Bad input on the command line itself: one line, exit status 2 (absl's parser exits here)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(errors.EXIT_USAGE)


HELP = ("-h", "-help", "--help", "--helpshort", "-?")
USAGE = """transfer-engine: trains image classifiers by transfer learning (README.md says how).

    python launch.py --flagfile=configs/frozen.flags [--flag=value ...]

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
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as error:
        fail(f"--flagfile: {str(error).replace('ERROR:: ', '')}")
    except flags.Error as error:
        fail(error)


def main(argv):
    """Runs the job of the parsed flags; returns the exit status."""
    if len(argv) > 1:
        fail(f"unexpected argument {argv[1]!r} (flags look like --name=value)")
    configure_logging(everything=flags.FLAGS["verbosity"].present)
    try:
        internals.check_versions()
        config = config_lib.from_flags()
        if config.cpu_replicas > 1:  # Before any job reads data: that initialises TensorFlow's devices.
            distribute.split_cpu(config.cpu_replicas)
        jobs.JOBS[config.job](config)
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


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""transfer-engine entry point.

    python launch.py --flagfile=configs/frozen.flags [--flag=value ...]

Parses flags into one validated Config, runs the job, and turns bad input into one line on stderr
(naming the flag and the value) with exit status 2 and no traceback.

Exit status: 0 done; 1 --job=compare finished but some mode failed (compare.md says why); 2 bad
input; 3 training diverged (non-finite loss; the last good checkpoint is kept); 75 preempted by
SIGTERM (a checkpoint was saved: rerun the same command to resume).
"""

import logging as std_logging
import os
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's C++ start-up chatter out.

from absl import app, flags, logging  # noqa: E402
import tensorflow as tf  # noqa: E402

from engine import config as config_lib  # noqa: E402
from engine import compare, jobs, loop  # noqa: E402

config_lib.define_flags()
flags.adopt_module_key_flags(config_lib)  # So --help lists them.
USAGE_ERROR = 2
ROOT = os.path.dirname(os.path.abspath(__file__))


def configure_logging():
    """Time-stamped INFO lines from this project; libraries only speak up from WARNING."""
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler().python_handler
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(
        lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(ROOT)
    )
    tf.get_logger().setLevel("WARNING")  # TensorFlow's own Python logger has its own handler.
    warnings.filterwarnings("ignore", message="To make it possible to preserve tf.data options")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as error:
        fail(f"--flagfile: {str(error).replace('ERROR:: ', '')}")
    except flags.Error as error:
        fail(error)


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected argument {argv[1]!r} (flags look like --name=value)")
    configure_logging()
    try:
        config = config_lib.from_flags()
        jobs.JOBS[config.job](config)
    except config_lib.ConfigError as error:
        fail(error)
    except loop.Diverged as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(loop.EXIT_DIVERGED)
    except compare.ModesFailed as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""How a run ends when it cannot finish: the errors a user reads as one line, and their exit statuses.

The one home of exit statuses. `launch.py` prints a `RunError` as `error: <message>` and exits with its
`exit_status`, without a traceback. Anything else that escapes a job is a bug in this project: it
keeps its traceback and exits 1. This module imports nothing from the project, so every layer can
raise these errors.
"""

EXIT_DONE = 0
EXIT_FAILED = 1  # A bug (traceback), or --job=compare finished with a mode that failed.
EXIT_USAGE = 2  # Bad input: a flag, a file, the environment. Nothing was written.
EXIT_DIVERGED = 3  # The loss stayed non-finite; the last good checkpoint is kept.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM saved a checkpoint; rerun the same command to resume.
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C (while training, after saving a checkpoint).


class RunError(Exception):
    """An expected way for a run to stop: shown as one line, exit status `exit_status`."""

    exit_status = EXIT_FAILED


class ConfigError(RunError, ValueError):
    """Bad user input: one line naming the flag (or file) and the value, and why it is refused."""

    exit_status = EXIT_USAGE

    def __init__(self, flag, value, reason):
        self.flag, self.value = flag, value
        shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        super().__init__(f"--{flag}={shown}: {reason}")


class UsageError(RunError, ValueError):
    """A command line (or the Python API's keywords) absl cannot parse: an unknown flag, a value of the wrong
    type, a flagfile that cannot be read. Its message is absl's."""

    exit_status = EXIT_USAGE


class UnsupportedLibrary(RunError):
    """An installed library's version this project was not checked against (see internals.py)."""

    exit_status = EXIT_USAGE


class Diverged(RunError, ArithmeticError):
    """The loss stayed non-finite: the run stops without checkpointing the broken state."""

    exit_status = EXIT_DIVERGED


class ModesFailed(RunError):
    """--job=compare ran every mode, and some failed; compare.md says which and why."""

    exit_status = EXIT_FAILED


def first_line(error):
    """The first line of an exception's message: libraries' errors are often long and multi-line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


NAMED = 5  # Files a log line names; the rest it counts.


def named(names, total=None):
    """`a, b, c, d, e and 7 more`: the first NAMED of `names` (out of `total`, default all of them)."""
    total = len(names) if total is None else total
    shown = list(names)[:NAMED]
    return ", ".join(shown) + (f" and {total - len(shown)} more" if total > len(shown) else "")

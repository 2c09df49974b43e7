"""The run directory (`--model_dir`): what a run leaves behind, and refusing to mix two runs in one.

    flags.txt        the resolved flags; `--flagfile=flags.txt` reruns (or resumes) the run
    checkpoints/     tf.train.CheckpointManager checkpoints (engine/core/checkpoints.py)
    logs/train,eval  TensorBoard summaries (logs/: the run's HParams row; logs/test: its test metrics)
    metrics.jsonl    one JSON line per epoch
    results.json     final metrics, parameter counts, devices, trainability audit
    model.keras      the trained classifier (takes raw uint8 images of any size)
    backbone.weights.h5  its backbone alone, usable as --weights of another run
    dataset.json     what its dataset held when it began (RunDir.check_same_data)
    run.lock         while a run trains in it: the holder's pid and host (RunDir.lock)
    saved_model/, model.tflite, model_int8.tflite, export.json   --job=export (engine/jobs/export.py)
    predictions.csv  --job=predict (engine/jobs/predict.py)
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time

from absl import logging
import tensorflow as tf

from transfer_engine import internals
from transfer_engine.engine import config as config_lib
from transfer_engine.errors import ConfigError

LOCK = "run.lock"
DATASET = "dataset.json"


class RunDir:
    def __init__(self, path):
        self.path = path
        self._writers = None  # TensorBoard's, created with the first epoch's record.

    def file(self, *parts):
        return os.path.join(self.path, *parts)

    @contextlib.contextmanager
    def lock(self):
        """Holds `run.lock` for a run's life: a second run on this directory is refused (ConfigError naming
        the holder). The operating system drops the lock when its process dies, however it dies, so the
        file a killed run leaves is recognised as stale and taken over with a warning."""
        try:
            os.makedirs(self.path, exist_ok=True)
            handle = open(self.file(LOCK), "a+")
        except OSError as error:
            raise ConfigError("model_dir", self.path, f"is not writable ({error.strerror})") from None
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(
                    "model_dir", self.path,
                    f"is in use by another run ({_holder(handle) or 'unknown'}); wait for it to end or use "
                    "another --model_dir",
                ) from None
            stale = _holder(handle)
            if stale:
                logging.warning("%s: took over the lock of a run that ended without releasing it (%s)",
                                self.path, stale)
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
            handle.flush()
            try:
                yield
            finally:
                handle.seek(0)
                handle.truncate()
                os.remove(self.file(LOCK))

    def refuse_if_training(self, job):
        """For a job that reads a finished run (evaluate, export, predict): while a run trains in this
        directory (it holds run.lock), one line naming it, rather than a mid-run checkpoint's results or a
        false cause when training rotates that checkpoint away."""
        try:
            handle = open(self.file(LOCK))
        except OSError:
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError("model_dir", self.path, f"is training now ({_holder(handle) or 'unknown'}): "
                                  f"--job={job} reads a finished run; wait for it to end") from None
            fcntl.flock(handle, fcntl.LOCK_UN)

    def check_compatible(self, config):
        """Refuses a directory holding a run of another configuration (before anything is written)."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError("model_dir", self.path, "exists and is not a directory")
        previous = read_flagfile(self.file("flags.txt"))
        current = read_flagfile_text(config.to_flagfile())
        for name in config_lib.IDENTITY_FLAGS:
            if name in previous and previous[name] != current.get(name):
                raise ConfigError(
                    "model_dir", self.path,
                    f"holds a run with --{name}={previous[name]}, not {current.get(name)}; "
                    "use another --model_dir",
                )

    def check_same_data(self, source):
        """Refuses to continue a run whose dataset changed since it began (a folder's images added, removed,
        renamed or rewritten; another TFDS version): its splits would move images between train, eval and
        test under the run. What it began on is in dataset.json."""
        changed = self.data_changed(source)
        if changed and self._has_checkpoints():
            raise ConfigError("dataset", source.name, f"{changed}: continuing would mix the splits; restore it, or "
                              "train in another --model_dir")

    def data_changed(self, source):
        """How `source` differs from what the run began on (None: the same, or not recorded)."""
        began = self.read_json(DATASET)
        if not began or began.get("contents") == source.contents:
            return None
        return (f"changed since the run in {self.path} began on it ({began.get('files')} images then, "
                f"{source.num_files} now, or their names, sizes or times differ)")

    def _has_checkpoints(self):
        return os.path.isdir(self.file("checkpoints")) and bool(os.listdir(self.file("checkpoints")))

    def start(self, config, source):
        """Creates the directory and writes flags.txt; the first write of a run. A directory whose name is so
        long that the checkpoint files below it would pass the system's limit on a path is refused here,
        not at the first save, an epoch later."""
        longest = len(os.fsencode(os.path.abspath(self.file(*LONGEST_FILE))))
        limit = _path_limit(self.path)
        if longest > limit:
            raise ConfigError("model_dir", self.path, f"is too long: files below it would have paths of {longest} "
                              f"bytes, over this system's limit of {limit}")
        try:
            os.makedirs(self.path, exist_ok=True)
            write_atomic(self.file("flags.txt"), config.to_flagfile())
            if not self.read_json(DATASET) or not self._has_checkpoints():
                self.write_json(DATASET, {"dataset": source.name, "contents": source.contents, "files": source.num_files})
        except OSError as error:
            raise ConfigError("model_dir", self.path, f"is not writable ({error.strerror})") from None

    def record_epoch(self, record):
        """An epoch's metrics: a line of metrics.jsonl and TensorBoard scalars in logs/train, logs/eval."""
        path, earlier = self.file("metrics.jsonl"), ""
        if os.path.exists(path):
            with open(path) as f:
                earlier = f.read()
        write_atomic(path, earlier + json.dumps(record) + "\n")  # Rewritten whole: never half a line.
        if self._writers is None:
            self._writers = {name: tf.summary.create_file_writer(self.file("logs", name)) for name in ("train", "eval")}
        step = record["global_step"]
        with self._writers["train"].as_default(step=step):
            tf.summary.scalar("loss", record["train_loss"])
            tf.summary.scalar("accuracy", record["train_accuracy"])
            tf.summary.scalar("learning_rate", record["learning_rate"])
            if record["images_per_sec"]:
                tf.summary.scalar("images_per_sec", record["images_per_sec"])
        if record["eval_loss"] is not None:
            with self._writers["eval"].as_default(step=step):
                tf.summary.scalar("loss", record["eval_loss"])
                tf.summary.scalar("accuracy", record["eval_accuracy"])
        for writer in self._writers.values():
            writer.flush()

    def record_hparams(self, hparams, test, step):
        """The run as a row of TensorBoard's HParams table (`tensorboard --logdir` over runs, or over a
        compare's modes): `hparams` (the flags that describe it) in logs/, and the test split's loss and
        accuracy (`test`, or None) in logs/test beside the epochs' train and eval scalars, its columns."""
        from tensorboard.plugins.hparams import api as hp  # TensorBoard's plugin; tf.summary writes it.

        with tf.summary.create_file_writer(self.file("logs")).as_default(step=step):
            hp.hparams(hparams, trial_id=os.path.basename(os.path.abspath(self.path)))
        if test:
            with tf.summary.create_file_writer(self.file("logs", "test")).as_default(step=step):
                tf.summary.scalar("loss", test["loss"])
                tf.summary.scalar("accuracy", test["accuracy"])

    def metrics(self):
        """Every line of metrics.jsonl as a dict, one per epoch done ([] before the first)."""
        if not os.path.exists(self.file("metrics.jsonl")):
            return []
        with open(self.file("metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]

    def last_metrics(self):
        """The last line of metrics.jsonl as a dict."""
        return self.metrics()[-1]

    def keep_metrics_until(self, epoch):
        """Drops metrics lines of epochs after `epoch` (written before a crash, not checkpointed)."""
        path = self.file("metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epoch]
        write_atomic(path, "".join(lines))

    def read_json(self, name):
        """A JSON file of the run ({} when absent)."""
        if not os.path.exists(self.file(name)):
            return {}
        with open(self.file(name)) as f:
            return json.load(f)

    def write_json(self, name, data):
        write_atomic(self.file(name), json.dumps(data, indent=2, sort_keys=True) + "\n")


# The longest path a run writes below its directory: a checkpoint's temporary shard as TensorFlow names it.
LONGEST_FILE = ("checkpoints", "ckpt-9999999_temp", "part-00000-of-00001.data-00000-of-00001.tempstate" + "9" * 20)


def _path_limit(path):
    """The longest path (bytes) the file system holding `path` (or its nearest existing parent) allows."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return os.pathconf(path, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 4096


def _holder(handle):
    """'pid N on HOST since HH:MM:SS' of the lock file's writer, or '' for an empty file."""
    handle.seek(0)
    text = handle.read()
    try:
        holder = json.loads(text or "null")
    except ValueError:
        holder = text
    if not holder:
        return ""
    if not isinstance(holder, dict) or not {"pid", "host", "since"} <= set(holder):  # Another tool's, or damaged.
        return f"a lock file holding {str(holder)[:40]!r}"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
    return f"pid {holder['pid']} on {holder['host']}, since {since}"


def write_atomic(path, text):
    """Writes text via a temporary file and a rename, so a kill or a full disk never leaves half a file. A
    file name that is not UTF-8 (Python's surrogate escapes, as os.listdir gives it) is written as its bytes."""
    with _renamed_into(path) as partial, open(partial, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(text)


TEMPORARY = "the temporary directory, TMPDIR"
PROBE_BYTES = 1 << 20


def check_temporary_space():
    """Raises OSError (ENOSPC) naming the temporary directory when it cannot take PROBE_BYTES: TensorFlow's
    autograph writes its converted code there (when it cannot, tracing falls back to a Python loop and runs
    for many minutes), and replace_atomic stages artifacts there."""
    try:
        with tempfile.TemporaryFile() as probe:
            probe.write(b"\0" * PROBE_BYTES)
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(error.errno, error.strerror, f"{tempfile.gettempdir()} ({TEMPORARY})") from None


def replace_atomic(path, write):
    """Calls `write(staged)` (a file or directory named like `path`, which Keras' savers check, in a
    local temporary directory), copies it beside `path` and renames it there: a kill or a full disk
    leaves the previous version or nothing, never half of it, and h5py never writes to a full disk
    (it fails there messily, once even crashing at exit)."""
    with tempfile.TemporaryDirectory(prefix="transfer-engine-") as staging:
        staged = os.path.join(staging, os.path.basename(path))
        try:
            write(staged)
        except Exception as error:  # A full temporary directory is named as such, not taken for --model_dir's.
            if internals.full_disk_path(error) is None:
                raise
            raise OSError(errno.ENOSPC, "No space left on device",
                          f"{tempfile.gettempdir()} ({TEMPORARY})") from error
        with _renamed_into(path) as partial:
            (shutil.copytree if os.path.isdir(staged) else shutil.copyfile)(staged, partial)


@contextlib.contextmanager
def _renamed_into(path):
    """A temporary path beside `path`, renamed to it when the block succeeds, removed in any case."""
    partial = os.path.join(os.path.dirname(path), ".partial-" + os.path.basename(path))
    _remove(partial)
    try:
        try:
            yield partial
        except OSError as error:  # Name the file a user knows (shutil's errors name none).
            raise OSError(error.errno, error.strerror, path) from error
        _sync(partial)  # Its bytes on disk before the rename makes them the file: a power loss leaves the
        if os.path.isdir(path) and os.path.isdir(partial):  # old file or the new one, never an empty one.
            shutil.rmtree(path)
        os.replace(partial, path)
        _sync_file(os.path.dirname(os.path.abspath(path)))  # The rename itself, as databases do.
    finally:
        _remove(partial)


def _sync(path):
    """fsync of a file, or of every file and folder below a folder (a SavedModel)."""
    if os.path.isdir(path):
        for folder, _, names in os.walk(path):
            for name in names:
                _sync_file(os.path.join(folder, name))
            _sync_file(folder)
    else:
        _sync_file(path)


def _sync_file(path):
    """fsync of one file or folder (a folder's entries: the names renamed into it)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def read_flagfile(path):
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return read_flagfile_text(f.read())


def read_flagfile_text(text):
    """`--name=value` lines -> {name: value} (strings)."""
    values = {}
    for line in text.splitlines():
        if line.startswith("--") and "=" in line:
            name, value = line[2:].split("=", 1)
            values[name] = value
    return values

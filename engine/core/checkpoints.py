"""Checkpoints: what a run saves, where each worker writes it, resuming, and preemption.

A checkpoint holds the model, the optimizer (loss-scale state included), the dropout RNG states, the
global step and the current epoch's running metric sums. The input position follows from the step:
every epoch of the training stream is a pure function of (seed, epoch) (data/pipeline.py), so a resumed
run rebuilds its epoch and skips the batches already trained on.

TensorFlow writes a checkpoint's files first and then points the directory's `checkpoint` state file
at them, so a kill while saving leaves the previous checkpoint the latest one. The chief writes to
`model_dir/checkpoints`; other workers write the same checkpoints to `workertemp_<id>` inside it
(TensorFlow's convention), and every worker restores from the chief's directory.

Preemption: `tf.distribute.experimental.PreemptionCheckpointHandler` catches SIGTERM, saves a checkpoint
at the next step boundary (in step with the other workers) and exits with EXIT_PREEMPTED; rerunning
the same command resumes. Ctrl-C (SIGINT) takes the same path while training and exits with
EXIT_INTERRUPTED; a second Ctrl-C stops at once (KeyboardInterrupt, which launch.py reports in one line).
"""

import os
import re
import shutil
import signal
import sys

from absl import logging
import tensorflow as tf

from transfer_engine import internals
from transfer_engine.errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, first_line


CHECKPOINT_INDEX = re.compile(r"ckpt-(\d+)\.index")
# Tests only: a step N makes the process stop itself (SIGSTOP) once, right after writing its first checkpoint at
# step N or later, so that a test signals, kills or outruns it at a known step whatever the machine's speed.
STOP_AFTER_CHECKPOINT = "TRANSFER_ENGINE_STOP_AFTER_CHECKPOINT"


def damage(path):
    """Why the checkpoint at `path` cannot be read back (every tensor is read, checksums checked), or
    None when it is intact."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError, OSError) as error:
        return first_line(error)
    return None


class Checkpoints:
    def __init__(self, *, model, optimizer, step, epoch_sums, directory, keep, is_chief=True, worker_index=0):
        weights = {id(weight) for weight in model.weights}
        rng = [variable for variable in model.variables if id(variable) not in weights]
        self.model, self.optimizer = model, optimizer
        self.step = step
        self.directory, self.keep, self.is_chief, self.worker_index = directory, keep, is_chief, worker_index
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step, epoch_sums=epoch_sums, rng=rng
        )
        self._open()
        self._preemption = None

    def _open(self):
        """The managers, reading the directory's `checkpoint` state file as it is now."""
        self.reader = tf.train.CheckpointManager(self.checkpoint, self.directory, max_to_keep=self.keep)
        self.writer = self.reader if self.is_chief else tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.directory, f"workertemp_{self.worker_index}"), max_to_keep=1
        )

    @property
    def latest(self):
        return self.reader.latest_checkpoint

    def _weights(self):
        """What evaluating a checkpoint reads: the model and the optimizer, which holds --ema's averages."""
        return tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)

    def restore(self, *, model_only=False):
        """Restores the newest checkpoint that reads back intact, if any; returns its path. `model_only`:
        the weights only (and their --ema averages), not the run's position.

        Damaged checkpoints (truncated or corrupted files) are named in a warning and skipped; with
        none intact, a ConfigError. A checkpoint of another configuration is refused with a ConfigError.
        Training (not `model_only`) also repairs the state file: rebuilt from the checkpoint files when
        it was lost, and without the damaged ones, whose files the run overwrites when it reaches
        their step."""
        present = self._present()
        if not present:
            return None
        damaged = []
        for path in present:
            problem = damage(path)
            if problem is None:
                break
            damaged.append(path)
            logging.warning("Checkpoint %s is damaged (%s); trying the one before it", path, problem)
        else:
            raise ConfigError(
                "model_dir", self._run_dir(),
                f"every checkpoint is damaged (newest {present[0]}: {damage(present[0])}); move "
                f"{self.directory} away to start over",
            )
        target = self._weights() if model_only else self.checkpoint
        try:
            status = target.restore(path)
            if model_only:
                status.expect_partial()
            else:
                status.assert_existing_objects_matched()
                status.expect_partial()  # The preemption handler's counter is restored once it attaches.
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ConfigError(
                "model_dir", self._run_dir(), f"its checkpoint does not fit this configuration ({first_line(error)})",
            ) from None
        if damaged:
            logging.warning("Restored %s instead of the damaged %s", path, ", ".join(damaged))
        if not model_only and self.is_chief and (damaged or self.latest != path):
            if self.latest is None:
                logging.warning("The checkpoint state file %s was missing: rebuilt from the %d checkpoints "
                                "present", os.path.join(self.directory, "checkpoint"), len(present))
            intact = [older for older in present if older not in damaged]
            internals.write_checkpoint_state(self.directory, path, list(reversed(intact)))
            self._open()
        return path

    def newest_before(self, step):
        """The newest checkpoint this run keeps from a step before `step`, or None."""
        earlier = [path for path in self.reader.checkpoints if int(path.rsplit("-", 1)[1]) < step]
        return earlier[-1] if earlier else None

    def _present(self):
        """Every checkpoint in the directory, newest first, from its files (the state file may be lost)."""
        if not os.path.isdir(self.directory):
            return []
        steps = sorted(
            (int(match.group(1)) for match in map(CHECKPOINT_INDEX.fullmatch, os.listdir(self.directory)) if match),
            reverse=True,
        )
        return [os.path.join(self.directory, f"ckpt-{step}") for step in steps]

    def _run_dir(self):
        return os.path.dirname(self.directory)

    def save(self):
        step = int(self.step.numpy())
        path = self.writer.save(checkpoint_number=step)
        cue = os.environ.get(STOP_AFTER_CHECKPOINT)
        if cue and step >= int(cue):
            del os.environ[STOP_AFTER_CHECKPOINT]  # Once.
            os.kill(os.getpid(), signal.SIGSTOP)
        return path

    @property
    def best(self):
        """Where --keep_best keeps the best epoch's checkpoint, apart from the rolling ones."""
        folder = self._run_dir() if self.is_chief else os.path.join(self.directory, f"workertemp_{self.worker_index}")
        return os.path.join(folder, "best")

    def save_best(self):
        """Writes the current state as the best checkpoint; the previous best is replaced only once the new
        one is whole (a kill in between leaves `best.old`, which `restore_best` reads)."""
        staging, old = self.best + ".new", self.best + ".old"
        shutil.rmtree(staging, ignore_errors=True)
        self.checkpoint.write(os.path.join(staging, "ckpt"))
        if os.path.isdir(self.best):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.best, old)
        os.replace(staging, self.best)
        shutil.rmtree(old, ignore_errors=True)

    def restore_best(self):
        """Loads the best checkpoint's weights (and their --ema averages); returns its step."""
        folder = self.best if os.path.isdir(self.best) else self.best + ".old"
        reader = tf.train.load_checkpoint(os.path.join(folder, "ckpt"))
        self._weights().read(os.path.join(folder, "ckpt")).expect_partial()
        return int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))

    def watch_preemption(self, cluster_resolver):
        """From now on SIGTERM saves a checkpoint at the next `run` and exits with EXIT_PREEMPTED, and so
        does Ctrl-C, with EXIT_INTERRUPTED, until `stop_watching`."""
        self._preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
            cluster_resolver, self.writer,
            termination_config=tf.distribute.experimental.TerminationConfig(
                save_fn=self.save, exit_fn=self._exit_preempted
            ),
        )
        self._interrupted = False
        self._default_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def stop_watching(self):
        """Ctrl-C is KeyboardInterrupt again (after training: nothing left to checkpoint)."""
        if self._preemption is not None:
            signal.signal(signal.SIGINT, self._default_sigint)

    def _on_ctrl_c(self, signum, frame):
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nCtrl-C: saving a checkpoint at the next step boundary (Ctrl-C again stops at once)",
              file=sys.stderr)
        signal.raise_signal(signal.SIGTERM)  # The preemption handler's own path, in step with other workers.

    def run(self, train_function, *args):
        """Runs one training call; a preemption signal received before it is handled here."""
        if self._preemption is None:
            return train_function(*args)
        return self._preemption.run(train_function, *args)

    def _exit_preempted(self):
        status = EXIT_INTERRUPTED if self._interrupted else EXIT_PREEMPTED
        logging.warning(
            "%s: saved %s at step %d; rerun the same command to resume (exit status %d)",
            "Interrupted" if self._interrupted else "Preempted", self.writer.latest_checkpoint,
            int(self.step.numpy()), status,
        )
        sys.exit(status)

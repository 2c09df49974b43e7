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
import signal
import sys

from absl import logging
import tensorflow as tf

from errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, first_line


class Checkpoints:
    def __init__(self, *, model, optimizer, step, epoch_sums, directory, keep, is_chief=True, worker_index=0):
        weights = {id(weight) for weight in model.weights}
        rng = [variable for variable in model.variables if id(variable) not in weights]
        self.model = model
        self.step = step
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=optimizer, step=step, epoch_sums=epoch_sums, rng=rng
        )
        self.reader = tf.train.CheckpointManager(self.checkpoint, directory, max_to_keep=keep)
        self.writer = self.reader if is_chief else tf.train.CheckpointManager(
            self.checkpoint, os.path.join(directory, f"workertemp_{worker_index}"), max_to_keep=1
        )
        self._preemption = None

    @property
    def latest(self):
        return self.reader.latest_checkpoint

    def restore(self, *, model_only=False):
        """Restores the latest checkpoint, if any; returns its path. A checkpoint of another
        configuration is refused with a ConfigError."""
        path = self.latest
        if not path:
            return None
        target = tf.train.Checkpoint(model=self.model) if model_only else self.checkpoint
        try:
            status = target.restore(path)
            if model_only:
                status.expect_partial()
            else:
                status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise ConfigError(
                "model_dir", os.path.dirname(os.path.dirname(path)),
                f"its checkpoint does not fit this configuration ({first_line(error)})",
            ) from None
        return path

    def save(self):
        return self.writer.save(checkpoint_number=int(self.step.numpy()))

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

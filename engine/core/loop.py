"""The outer training loop: epochs of `steps_per_loop` chunks, checkpoints, evaluation, progress and the
divergence guard.

It only drives, and knows only what it is given (as Orbit's controller knows only its runner): the
schedule (numbers), the stage schedule (epoch -> Trainer, engine/core/steps.py), the run state it advances
(step counter and epoch sums), the distributed streams, a checkpoint saver (engine/core/checkpoints.py) and
a sink for each epoch's metrics (engine/core/run_dir.py).
"""

import dataclasses
import math
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from transfer_engine.engine.core.steps import summarize
from transfer_engine.errors import Diverged

NAN_PATIENCE = 2  # Consecutive training calls with a non-finite loss before the run stops.


@dataclasses.dataclass(frozen=True)
class Schedule:
    epochs: int
    steps_per_epoch: int
    steps_per_loop: int  # Steps per tf.function call.
    checkpoint_every: int  # Steps between checkpoints within an epoch (0: at epoch ends only).
    global_batch_size: int
    loss_upper_bound: float = math.inf  # A call's mean loss above it counts as diverged.

    @classmethod
    def of(cls, config, steps_per_epoch, num_classes):
        return cls(epochs=config.epochs, steps_per_epoch=steps_per_epoch, steps_per_loop=config.steps_per_loop,
                   checkpoint_every=config.checkpoint_every, global_batch_size=config.step_batch,
                   loss_upper_bound=config.loss_upper_bound or default_loss_upper_bound(num_classes))


def default_loss_upper_bound(num_classes):
    """100 times the cross-entropy of a uniform guess over the classes: no model that learns is there."""
    return 100 * math.log(num_classes)


class Throughput:
    """Images/sec over the calls added to it."""

    def __init__(self):
        self.images = 0
        self.seconds = 0.0

    def add(self, images, seconds):
        self.images += images
        self.seconds += seconds

    @property
    def images_per_sec(self):
        return self.images / self.seconds if self.seconds else None


def train_epochs(*, schedule, stages, state, train_dataset, eval_dataset, checkpoints, record_epoch,
                 progress_label="", history=(), patience=0, on_best=None):
    """Trains from the step in `state` to the end of the schedule, or until `patience` epochs in a row
    have not raised the eval accuracy (0: never); returns (the last epoch's metrics, throughput, whether
    it stopped early).

    `history` holds the eval accuracies of the epochs done (a resumed run's); `on_best(epoch)` is called
    after the checkpoint of an epoch that raised it (and again on resuming at the end of such an epoch).

    `stages(epoch)` gives the epoch's Trainer; `state` holds the `step` and `epoch_sums` variables;
    `train_dataset` is a distributed stream positioned at that step; `eval_dataset` is evaluated after
    each epoch (None: none); `checkpoints` has `run(function, *args)` (a training call, watched for
    preemption), `save()` and `newest_before(step)`; `record_epoch(dict)` receives each epoch's metrics, before its
    checkpoint (so a resume can drop the records of epochs it has no checkpoint of). `progress_label`
    prefixes the progress bar (--job=compare says which mode of how many).
    """
    steps, step_counter, epoch_sums = schedule.steps_per_epoch, state.step, state.epoch_sums
    first_epoch, done = divmod(int(step_counter.numpy()), steps)
    iterator = iter(train_dataset)
    throughput = Throughput()  # The run's, leaving out each stage's first call (it traces).
    traced, non_finite, last_finite_step = set(), 0, int(step_counter.numpy())
    bound = schedule.loss_upper_bound
    history, stopped = list(history), False
    if on_best and done == 0 and history and _epochs_since_best(history) == 0:
        on_best(len(history))  # A kill may have come between that epoch's checkpoint and on_best.
    record = {}
    for epoch in range(first_epoch, schedule.epochs):
        if patience and done == 0 and history and _epochs_since_best(history) >= patience:
            logging.info("Early stopping: the eval accuracy has not risen for %d epochs (best %.4f, epoch %d)",
                         patience, max(history), len(history) - _epochs_since_best(history))
            stopped = True
            break
        trainer = stages(epoch)
        if done == 0:
            epoch_sums.assign(tf.zeros([3], tf.float64))
        epoch_throughput = Throughput()
        started = time.perf_counter()
        bar = tqdm(
            total=steps, initial=done, desc=f"{progress_label}epoch {epoch + 1}/{schedule.epochs}", unit="step"
        )
        while done < steps:
            step = int(step_counter.numpy())
            count = min(schedule.steps_per_loop, steps - done)
            if schedule.checkpoint_every:
                count = min(count, schedule.checkpoint_every - step % schedule.checkpoint_every)
            call_started = time.perf_counter()
            sums = checkpoints.run(trainer.train_steps, iterator, tf.constant(count)).numpy()
            if trainer in traced:
                for meter in (throughput, epoch_throughput):
                    meter.add(count * schedule.global_batch_size, time.perf_counter() - call_started)
            traced.add(trainer)
            step_counter.assign_add(count)
            epoch_sums.assign_add(sums)
            done += count
            call_loss = sums[0] / max(sums[2], 1)
            if np.isfinite(call_loss) and call_loss <= bound:
                non_finite, last_finite_step = 0, step + count
            else:
                non_finite += 1
                if non_finite >= NAN_PATIENCE:
                    bar.close()
                    what = "not finite" if not np.isfinite(call_loss) else f"loss above --loss_upper_bound={bound:.4g}"
                    raise _diverged(f"{what} from step {last_finite_step + 1} to {step + count}", checkpoints,
                                    last_finite_step)
            current = summarize(epoch_sums.numpy())
            bar.update(count)
            bar.set_postfix(
                loss=f"{current['loss']:.4f}", acc=f"{current['accuracy']:.4f}",
                img_s=_fmt(epoch_throughput.images_per_sec),
            )
            if schedule.checkpoint_every and not non_finite and done < steps and (
                (step + count) % schedule.checkpoint_every == 0
            ):
                _save(checkpoints, trainer, step + count, last_finite_step)
        bar.close()
        done = 0
        if non_finite:  # The epoch ended on a non-finite call: no checkpoint of it.
            continue
        train_metrics = summarize(epoch_sums.numpy())
        eval_metrics = summarize(trainer.evaluate(eval_dataset)) if eval_dataset is not None else None
        record = {
            "epoch": epoch + 1,
            "global_step": int(step_counter.numpy()),
            "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
            "eval_loss": eval_metrics["loss"] if eval_metrics else None,
            "eval_accuracy": eval_metrics["accuracy"] if eval_metrics else None,
            "images_per_sec": epoch_throughput.images_per_sec,
            "learning_rate": float(trainer.optimizer.learning_rate.numpy()),
            "seconds": time.perf_counter() - started,
        }
        record_epoch(record)
        _save(checkpoints, trainer, int(step_counter.numpy()), last_finite_step)
        if eval_metrics:
            history.append(eval_metrics["accuracy"])
            if on_best and _epochs_since_best(history) == 0:
                on_best(epoch + 1)
        logging.info(
            "epoch %d/%d: train loss %.4f acc %.4f%s | %s img/s",
            epoch + 1, schedule.epochs, train_metrics["loss"], train_metrics["accuracy"],
            f" | eval loss {eval_metrics['loss']:.4f} acc {eval_metrics['accuracy']:.4f}"
            if eval_metrics else "",
            _fmt(epoch_throughput.images_per_sec),
        )
    return record, throughput, stopped


def _epochs_since_best(history):
    """Epochs since the highest eval accuracy of `history` (its first occurrence)."""
    return len(history) - 1 - int(np.argmax(history))


def _save(checkpoints, trainer, step, last_finite_step):
    """Checkpoints, unless a variable of the model (BatchNorm statistics included) or the optimizer is
    not finite (a finite loss can precede a non-finite update)."""
    for variable in trainer.model.variables + list(trainer.optimizer.variables):
        if keras.backend.is_float_dtype(variable.dtype) and not bool(tf.reduce_all(tf.math.is_finite(variable))):
            raise _diverged(f"{variable.path} not finite after step {step}", checkpoints, last_finite_step)
    checkpoints.save()


def _diverged(what, checkpoints, last_finite_step):
    """The error naming the last good checkpoint: the newest from before `last_finite_step`, whose
    weights a training call has since run with a finite loss (a checkpoint's weights are only proven by
    the call after it: one update can take finite weights to a model whose logits are not)."""
    good = checkpoints.newest_before(last_finite_step)
    return Diverged(
        f"training diverged: {what}; last good checkpoint: {good or 'none'} (lower --learning_rate, or check the data)"
    )


def _fmt(images_per_sec):
    return f"{images_per_sec:.0f}" if images_per_sec else "-"

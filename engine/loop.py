"""The outer training loop: epochs of `steps_per_loop` chunks, checkpoints, evaluation, summaries,
progress and the divergence guard. It only drives; the steps live in engine/trainer.py, the data in
data/pipeline.py, saving and preemption in engine/checkpoints.py."""

import time

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from engine.trainer import summarize

EXIT_DIVERGED = 3
NAN_PATIENCE = 2  # Consecutive training calls with a non-finite loss before the run stops.


class Diverged(RuntimeError):
    """The loss stayed non-finite: the run stops without checkpointing the broken state."""


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


def train_epochs(*, setup, run_dir, train_dataset, eval_dataset, progress_label=""):
    """Trains from the checkpointed step to the end of `--epochs` on `train_dataset` (a distributed
    stream positioned at that step); returns (the last epoch's metrics, throughput). `progress_label`
    prefixes the progress bar (--job=compare says which mode of how many)."""
    config, steps, checkpoints = setup.config, setup.steps_per_epoch, setup.checkpoints
    first_epoch, done = divmod(int(setup.step.numpy()), steps)
    iterator = iter(train_dataset)
    writers = {name: tf.summary.create_file_writer(run_dir.file("logs", name)) for name in ("train", "eval")}
    throughput = Throughput()  # The run's, leaving out each stage's first call (it traces).
    traced, non_finite, last_finite_step = set(), 0, int(setup.step.numpy())
    record = {}
    for epoch in range(first_epoch, config.epochs):
        trainer = setup.trainer_for(epoch)
        if done == 0:
            setup.epoch_sums.assign(tf.zeros([3], tf.float64))
        epoch_throughput = Throughput()
        started = time.perf_counter()
        bar = tqdm.tqdm(
            total=steps, initial=done, desc=f"{progress_label}epoch {epoch + 1}/{config.epochs}", unit="step"
        )
        while done < steps:
            step = int(setup.step.numpy())
            count = min(config.steps_per_loop, steps - done)
            if config.checkpoint_every:
                count = min(count, config.checkpoint_every - step % config.checkpoint_every)
            call_started = time.perf_counter()
            sums = checkpoints.run(trainer.train_steps, iterator, tf.constant(count)).numpy()
            if trainer in traced:
                for meter in (throughput, epoch_throughput):
                    meter.add(count * config.batch_size, time.perf_counter() - call_started)
            traced.add(trainer)
            setup.step.assign_add(count)
            setup.epoch_sums.assign_add(sums)
            done += count
            if np.isfinite(sums[0]):
                non_finite, last_finite_step = 0, step + count
            else:
                non_finite += 1
                if non_finite >= NAN_PATIENCE:
                    bar.close()
                    raise _diverged(last_finite_step, step + count, checkpoints)
            current = summarize(setup.epoch_sums.numpy())
            bar.update(count)
            bar.set_postfix(
                loss=f"{current['loss']:.4f}", acc=f"{current['accuracy']:.4f}",
                img_s=_fmt(epoch_throughput.images_per_sec),
            )
            if config.checkpoint_every and not non_finite and done < steps and (
                (step + count) % config.checkpoint_every == 0
            ):
                _save(checkpoints, trainer, last_finite_step)
        bar.close()
        done = 0
        if non_finite:  # The epoch ended on a non-finite call: no checkpoint of it.
            continue
        train_metrics = summarize(setup.epoch_sums.numpy())
        eval_metrics = summarize(trainer.evaluate(eval_dataset)) if eval_dataset is not None else None
        global_step = int(setup.step.numpy())
        record = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
            "eval_loss": eval_metrics["loss"] if eval_metrics else None,
            "eval_accuracy": eval_metrics["accuracy"] if eval_metrics else None,
            "images_per_sec": epoch_throughput.images_per_sec,
            "learning_rate": float(setup.optimizer.learning_rate.numpy()),
            "seconds": time.perf_counter() - started,
        }
        # Metrics first, then the checkpoint: a resume drops lines of epochs it has no checkpoint for.
        run_dir.append_metrics(record)
        _save(checkpoints, trainer, last_finite_step)
        _summaries(writers, record, global_step)
        logging.info(
            "epoch %d/%d: train loss %.4f acc %.4f%s | %s img/s",
            epoch + 1, config.epochs, train_metrics["loss"], train_metrics["accuracy"],
            f" | eval loss {eval_metrics['loss']:.4f} acc {eval_metrics['accuracy']:.4f}"
            if eval_metrics else "",
            _fmt(epoch_throughput.images_per_sec),
        )
    return record, throughput


def _save(checkpoints, trainer, step):
    """Checkpoints, unless a trained variable is not finite (a finite loss can precede a non-finite
    update): a checkpoint is always a state worth resuming from."""
    if not all(bool(tf.reduce_all(tf.math.is_finite(variable))) for variable in trainer.variables):
        raise _diverged(step, step, checkpoints)
    checkpoints.save()


def _diverged(last_finite_step, step, checkpoints):
    return Diverged(
        f"training diverged: not finite from step {last_finite_step + 1} to {step}; last good "
        f"checkpoint: {checkpoints.latest or 'none'} (lower --learning_rate, or check the data)"
    )


def _fmt(images_per_sec):
    return f"{images_per_sec:.0f}" if images_per_sec else "-"


def _summaries(writers, record, step):
    with writers["train"].as_default(step=step):
        tf.summary.scalar("loss", record["train_loss"])
        tf.summary.scalar("accuracy", record["train_accuracy"])
        tf.summary.scalar("learning_rate", record["learning_rate"])
        if record["images_per_sec"]:
            tf.summary.scalar("images_per_sec", record["images_per_sec"])
    if record["eval_loss"] is not None:
        with writers["eval"].as_default(step=step):
            tf.summary.scalar("loss", record["eval_loss"])
            tf.summary.scalar("accuracy", record["eval_accuracy"])
    for writer in writers.values():
        writer.flush()

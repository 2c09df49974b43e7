"""The outer training loop: epochs of `steps_per_loop` chunks, evaluation, checkpoints, summaries and
progress. It only drives; the steps live in engine/trainer.py and the data in data/pipeline.py."""

import time

from absl import logging
import numpy as np
import tensorflow as tf
import tqdm

from engine.trainer import summarize


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


def train_epochs(*, setup, run_dir, train_dataset, eval_dataset):
    """Trains from the checkpointed epoch to `--epochs` on `train_dataset` (a distributed stream that
    starts at that epoch); returns (last epoch's metrics, throughput)."""
    config, steps = setup.config, setup.steps_per_epoch
    first_epoch = int(setup.epoch.numpy())
    iterator = iter(train_dataset)
    writers = {name: tf.summary.create_file_writer(run_dir.file("logs", name)) for name in ("train", "eval")}
    throughput = Throughput()  # The run's, leaving out each stage's first call (it traces).
    traced = set()
    record = {}
    for epoch in range(first_epoch, config.epochs):
        trainer = setup.trainer_for(epoch)
        epoch_throughput = Throughput()
        started = time.perf_counter()
        totals = np.zeros(3)
        bar = tqdm.tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=True)
        done = 0
        while done < steps:
            count = min(config.steps_per_loop, steps - done)
            call_started = time.perf_counter()
            sums = trainer.train_steps(iterator, tf.constant(count)).numpy()
            if trainer in traced:
                for meter in (throughput, epoch_throughput):
                    meter.add(count * config.batch_size, time.perf_counter() - call_started)
            traced.add(trainer)
            totals += sums
            done += count
            current = summarize(totals)
            bar.update(count)
            bar.set_postfix(
                loss=f"{current['loss']:.4f}", acc=f"{current['accuracy']:.4f}",
                img_s=_fmt(epoch_throughput.images_per_sec),
            )
        bar.close()
        train_metrics = summarize(totals)
        eval_metrics = summarize(trainer.evaluate(eval_dataset)) if eval_dataset is not None else None
        setup.epoch.assign(epoch + 1)
        global_step = int(setup.optimizer.iterations.numpy())
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
        setup.checkpoints.save(checkpoint_number=global_step)
        _summaries(writers, record, global_step)
        logging.info(
            "epoch %d/%d: train loss %.4f acc %.4f%s | %s img/s",
            epoch + 1, config.epochs, train_metrics["loss"], train_metrics["accuracy"],
            f" | eval loss {eval_metrics['loss']:.4f} acc {eval_metrics['accuracy']:.4f}"
            if eval_metrics else "",
            _fmt(epoch_throughput.images_per_sec),
        )
    return record, throughput


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

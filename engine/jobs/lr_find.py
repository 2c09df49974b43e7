"""`--job=lr_find`: a learning-rate range test (Smith 2015; fastai's `lr_find`). From the run's own
data, mode, model and optimizer, train one step at each of exponentially growing learning rates, and
stop once the loss explodes. Nothing is checkpointed and no trained state is kept: the job writes
lr_find.json and lr_find.png in --model_dir, and the weights it moved are dropped with the process.
"""

import dataclasses
import math
import os

from absl import logging
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from transfer_engine.engine.core import assembly, feature_cache
from transfer_engine.engine.reports import figures
from transfer_engine.engine.core.run_dir import RunDir, replace_atomic
from transfer_engine.engine.core.steps import Stages

MIN_RATE, MAX_RATE = 1e-7, 10.0
STEPS = 100
SMOOTHING = 0.98  # Exponential moving average of the loss, bias-corrected (fastai's).
EXPLODED = 4.0  # Stop once the smoothed loss exceeds this multiple of its minimum.
RULE = ("the rate where the smoothed loss falls fastest (its steepest slope against log rate), "
        "between the first step and the minimum")


def lr_find(config):
    """Runs the sweep and writes its report; returns it."""
    config = dataclasses.replace(config, lr_schedule="constant", warmup_steps=0, eval_split="", test_split="")
    run = assembly.build(dataclasses.replace(config, epochs=10_000))  # The stream outlasts the sweep.
    splits, features = run.splits, None
    if feature_cache.reason_not_to_cache(config) is None:
        features = feature_cache.build(run)
        splits = features.splits if features else splits
    stages = Stages(run, step_model=features.upper if features else None)
    trainer = stages(config.head_epochs)  # The stage that fine-tunes, for a staged run.
    iterator = iter(run.train_dataset(splits["train"]))
    rates, losses, smoothed = [], [], []
    average = 0.0
    for step, rate in enumerate(tqdm(np.geomspace(MIN_RATE, MAX_RATE, STEPS), desc="lr_find", unit="step")):
        run.optimizer.learning_rate = float(rate)
        sums = trainer.train_steps(iterator, tf.constant(1)).numpy()
        loss = float(sums[0] / sums[2])
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        rates.append(float(rate))
        losses.append(loss)
        smoothed.append(average / (1 - SMOOTHING ** (step + 1)))
        if exploded(smoothed):
            break
    report = {"rates": rates, "losses": losses, "smoothed_losses": smoothed, "suggested_rate": suggest(rates, smoothed),
              "rule": RULE, "stopped": "loss exploded" if len(rates) < STEPS else f"{STEPS} steps",
              "mode": config.mode, "optimizer": config.optimizer, "batch_size": config.batch_size}
    run_dir = RunDir(config.model_dir)
    os.makedirs(config.model_dir, exist_ok=True)
    run_dir.write_json("lr_find.json", report)
    plot(report, run_dir.file("lr_find.png"))
    logging.info("lr_find: %d steps from %.0e to %.2g (%s); suggested --learning_rate=%.2g (%s); %s and lr_find.png",
                 len(rates), rates[0], rates[-1], report["stopped"], report["suggested_rate"], RULE,
                 run_dir.file("lr_find.json"))
    return report


def exploded(smoothed):
    """Whether the sweep should stop: the smoothed loss is no longer finite, or EXPLODED x its minimum."""
    return not math.isfinite(smoothed[-1]) or smoothed[-1] > EXPLODED * min(smoothed)


def suggest(rates, smoothed):
    """RULE: the rate of the most negative slope of the smoothed loss against log10(rate), up to the minimum."""
    end = int(np.nanargmin(smoothed)) + 1
    if end < 3:
        return rates[0]
    slopes = np.gradient(np.asarray(smoothed[:end]), np.log10(rates[:end]))
    return float(rates[int(np.argmin(slopes))])


def plot(report, path):
    """Smoothed loss against learning rate (log axis), the suggestion marked."""
    figure, axes = figures.new(figsize=(7, 4.2))
    axes.plot(report["rates"], report["losses"], color="lightgray", lw=1, label="loss")
    axes.plot(report["rates"], report["smoothed_losses"], lw=2, label="smoothed loss")
    suggested = report["suggested_rate"]
    axes.axvline(suggested, color="red", ls="--", lw=1, label=f"suggested {suggested:.2g}")
    axes.set_xscale("log")
    finite = [value for value in report["smoothed_losses"] if math.isfinite(value)]
    if finite:
        axes.set_ylim(min(finite) * 0.9, min(max(finite), EXPLODED * min(finite)) * 1.05)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(f"lr_find: --mode={report['mode']}, --optimizer={report['optimizer']}, batch {report['batch_size']}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    replace_atomic(path, lambda temporary: figure.savefig(temporary, dpi=110))

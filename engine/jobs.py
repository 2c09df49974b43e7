"""The jobs (`--job=`): one function each, taking a validated config.

    train      engine/training.py   assemble, resume, train, write the run's results
    evaluate   here                 the latest checkpoint on the eval and test splits
    export     here                 model.keras as a SavedModel
    benchmark  engine/benchmark.py  throughput per mode against Keras' fit
    compare    engine/compare.py    every mode with the same flags, side by side
"""

import os

from absl import logging
import keras

from engine import assembly, benchmark, compare, training
from engine.run_dir import RunDir
from engine.trainer import Stages
from errors import ConfigError


def evaluate(config):
    """Evaluates the latest checkpoint of --model_dir on the eval and test splits."""
    run_dir = RunDir(config.model_dir)
    run = assembly.build(config, pretrained=False)
    restored = run.checkpoints.restore(model_only=True)
    if not restored:
        raise ConfigError("model_dir", config.model_dir, "has no checkpoint to evaluate")
    trainer = Stages(run)(run.epochs_done)
    evaluation = {"job": "evaluate", "checkpoint": restored}
    for name in ("eval", "test"):
        metrics = training.evaluate_split(run, trainer, run.splits[name])
        for key in ("loss", "accuracy", "examples", "class_accuracy"):
            evaluation[f"{name}_{key}"] = metrics[key] if metrics else None
    run_dir.write_json("evaluation.json", evaluation)
    logging.info(
        "Evaluated %s: eval accuracy %s, test accuracy %s (%s test examples)",
        restored, training.fmt(evaluation["eval_accuracy"]), training.fmt(evaluation["test_accuracy"]),
        evaluation["test_examples"],
    )
    return evaluation


def export(config):
    """Writes the trained classifier as a SavedModel for TF Serving: raw uint8 images of any size in,
    logits out (its `serve` function), the preprocessing inside."""
    run_dir = RunDir(config.model_dir)
    source = run_dir.file("model.keras")
    if not os.path.exists(source):
        raise ConfigError("model_dir", config.model_dir, "has no model.keras to export (train it first)")
    target = run_dir.file("saved_model")
    keras.saving.load_model(source).export(target, verbose=False)
    logging.info("Exported %s to %s (signature serving_default: uint8 images -> logits)", source, target)
    return {"job": "export", "saved_model": target}


JOBS = {
    "train": training.train,
    "evaluate": evaluate,
    "export": export,
    "benchmark": benchmark.benchmark,
    "compare": compare.compare,
}

"""`--job=train`: assemble the run, resume it, train it to the end of `--epochs`, and write what it
leaves (model.keras, backbone.weights.h5, results.json) in `--model_dir`."""

import contextlib
import dataclasses
import os
import time

from absl import logging

from transfer_engine.engine import reports
from transfer_engine.engine.core import assembly, feature_cache, loop
from transfer_engine.engine.core.optimizer import use_averaged_weights
from transfer_engine.engine.core.run_dir import RunDir, replace_atomic
from transfer_engine.engine.core.steps import Stages
from transfer_engine.engine.jobs import inspect
from transfer_engine.engine.reports import confidence, fmt, predictions
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER


@dataclasses.dataclass(frozen=True)
class Ready:
    """What training steps on, decided before the loop: the inputs per split (the images, or with the
    feature cache their features), the cache, the stage schedule, and the weights before (the audit's)."""

    splits: dict
    features: object  # engine/core/feature_cache.py's, or None.
    stages: Stages
    before: dict


@dataclasses.dataclass(frozen=True)
class Trained:
    """What the loop leaves: the metrics of the epoch the run keeps (the last, or the best with
    --keep_best), its throughput, and whether early stopping ended it."""

    kept: dict
    throughput: object
    stopped: bool


@dataclasses.dataclass(frozen=True)
class Results:
    """results.json: its fields are its schema (docs/using-a-trained-model.md#resultsjson)."""

    job: str
    mode: str
    backbone: str
    dataset: str
    class_names: list
    global_step: int
    epochs_completed: int
    stopped_early: bool
    best_epoch: object  # int with --keep_best, else None.
    trainable_params: int
    non_trainable_params: int
    train_loss: float
    train_accuracy: float
    eval_loss: object
    eval_accuracy: object
    # From the reports (engine/reports/__init__.py), over the test split's one prediction pass:
    test_loss: object = None
    test_accuracy: object = None
    test_examples: object = None
    test_class_accuracy: object = None
    test_confusion_matrix: object = None
    test_top_losses: object = None
    calibration: object = None
    images_per_sec: float = 0.0
    feature_cache: object = None
    skipped_examples: dict = None
    devices: dict = None
    input: dict = None  # What model.keras takes.
    trainability_audit: dict = None
    wall_seconds: float = 0.0


def train(config, *, progress_label="", report_list=reports.DEFAULT):
    """Trains (or resumes) a run in --model_dir and writes its results: the phases below, in order."""
    started = time.time()
    if config.unknown_dir:
        confidence.unknown_paths(config.unknown_dir)
    run = assembly.build(config)
    # Other workers write what the chief writes to a directory of their own (TensorFlow's convention).
    run_dir = RunDir(run.config.model_dir if run.devices.is_chief else
                     os.path.join(run.config.model_dir, f"workertemp_{run.devices.worker_index}"))
    run_dir.check_compatible(run.config)  # With the splits the dataset decided.
    run_dir.check_same_data(run.source)
    # One run per directory at a time; other workers write directories of their own.
    with run_dir.lock() if run.devices.is_chief else contextlib.nullcontext():
        finished = _finished_already(run, run_dir)
        if finished is not None:
            return finished
        ready = _preflight(run, run_dir)
        trained = _loop(run, run_dir, ready, progress_label)
        kept = _final_weights(run, run_dir, trained)
        trainer = ready.stages(run.epochs_done - 1)
        predicted = {name: predictions.predict(run, trainer, name, inputs=ready.splits[name] if ready.features else None)
                     for name in ("eval", "test")}
        _save_artifacts(run, run_dir)
        step = int(run.state.step.numpy())
        reported = reports.write(report_list, reports.Finished(run, run_dir, predicted, step=step))
        results = _results(run, ready, trained, kept, reported, started)
        run_dir.write_json("results.json", dataclasses.asdict(results))
        logging.info("Done: test accuracy %s, eval accuracy %s, %s images/sec; results in %s",
                     fmt(results.test_accuracy), fmt(results.eval_accuracy), fmt(results.images_per_sec, ".0f"),
                     run_dir.file("results.json"))
        return dataclasses.asdict(results)


def _finished_already(run, run_dir):
    """The results of a run that has nothing left to train (its missing artifacts written again), or None
    after restoring the latest checkpoint of one that has."""
    restored = run.checkpoints.restore()
    finished = run_dir.read_json("results.json")
    if not (restored and (run.epochs_done >= run.config.epochs or finished.get("stopped_early")) and (
        finished.get("global_step") == int(run.state.step.numpy())
    )):
        if restored:
            logging.info("Resuming from %s (step %d, epoch %d)", restored, int(run.state.step.numpy()),
                         run.epochs_done + 1)
        return None
    missing = [name for name in ARTIFACTS if not os.path.exists(run_dir.file(name))]
    if missing:
        logging.warning("Complete, but %s missing: written again from %s", " and ".join(missing), restored)
        _use_final_weights(run)
        _save_artifacts(run, run_dir)
        return finished
    logging.info("Complete: this run has trained %d epochs (step %d)%s; nothing changed. Its results are in "
                 "%s; a larger --epochs continues it", run.epochs_done, finished["global_step"],
                 ", stopping early" if finished.get("stopped_early") else "", run_dir.file("results.json"))
    return finished


def _preflight(run, run_dir):
    """The run's first write, its warnings (duplicates, BatchNorm and EMA that cannot settle), the feature
    cache, and what trains, in the log."""
    config = run.config
    run_dir.start(config, run.source)
    inspect.warn_if_duplicated(run_dir, config, run.source)
    splits, features = run.splits, None
    why_not = feature_cache.reason_not_to_cache(config)
    if why_not is None:
        features = feature_cache.build(run)
        if features:
            splits = features.splits
    elif run.mode.feature_cache and config.feature_cache == "auto":
        logging.info("Feature cache off: %s", why_not)
    stages = Stages(run, step_model=features.upper if features else None)
    logging.info(
        "What trains (mode %s%s):\n%s", config.mode,
        f", the head alone for the first {config.head_epochs} epochs" if config.head_epochs else "",
        trainability.format_table(trainability.parameter_table(run.model, run.trained_variables)),
    )
    _warn_if_unsettled(run.model, config, run.steps_per_epoch * config.epochs)
    return Ready(splits=splits, features=features, stages=stages, before=trainability.snapshot(run.model))


def _warn_if_unsettled(model, config, total_steps):
    """BatchNorm statistics and --ema's averages that a run this short cannot settle lag its training."""
    settling = trainability.settling_momentum(total_steps)
    slow = trainability.slow_batchnorm_momentum(model, total_steps)
    if slow:
        logging.warning(
            "BatchNorm momentum %g averages its statistics over ~%d steps, but this run has %d: "
            "evaluation will lag training (%s)", slow, round(1 / (1 - slow)), total_steps,
            f"consider --bn_momentum={settling:g} or lower" if settling else "too few steps for any momentum to settle",
        )
    if config.ema and not trainability.settles(config.ema, total_steps):
        logging.warning(
            "--ema=%g averages the weights over ~%d steps, but this run has %d: the averages will lag the "
            "training (%s)", config.ema, round(1 / (1 - config.ema)), total_steps,
            f"consider --ema={settling:g} or lower" if settling else "too few steps for any decay to settle",
        )


def _loop(run, run_dir, ready, progress_label):
    """The epochs left, checkpointed (engine/core/loop.py)."""
    config = run.config
    run_dir.keep_metrics_until(run.epochs_done)
    run.checkpoints.watch_preemption(run.devices.cluster_resolver)
    history = [record["eval_accuracy"] for record in run_dir.metrics()]
    try:
        last, throughput, stopped = loop.train_epochs(
            schedule=loop.Schedule.of(config, run.steps_per_epoch, run.source.num_classes), stages=ready.stages,
            state=run.state, train_dataset=run.train_dataset(ready.splits["train"]),
            eval_dataset=run.eval_dataset(ready.splits["eval"]), checkpoints=run.checkpoints,
            record_epoch=run_dir.record_epoch, progress_label=progress_label, history=history,
            patience=config.early_stopping,
            on_best=(lambda epoch: run.checkpoints.save_best()) if config.keep_best else None,
        )
    finally:
        run.checkpoints.stop_watching()
    return Trained(kept=last or run_dir.last_metrics(), throughput=throughput, stopped=stopped)


def _final_weights(run, run_dir, trained):
    """Puts the weights the run keeps in its model; the metrics of their epoch."""
    best_step = _use_final_weights(run)
    if not run.config.keep_best:
        return trained.kept
    kept = next(record for record in run_dir.metrics() if record["global_step"] == best_step)
    logging.info("Keeping the best epoch, %d of %d (eval accuracy %.4f): model.keras, backbone.weights.h5 "
                 "and the test come from it", kept["epoch"], run.epochs_done, kept["eval_accuracy"])
    return kept


def _results(run, ready, trained, kept, reported, started):
    config = run.config
    trainable, frozen = trainability.parameter_counts(run.model, run.trained_variables)
    return Results(
        job="train", mode=config.mode, backbone=config.backbone, dataset=config.dataset,
        class_names=list(run.source.class_names), global_step=int(run.state.step.numpy()),
        epochs_completed=run.epochs_done, stopped_early=trained.stopped,
        best_epoch=kept["epoch"] if config.keep_best else None, trainable_params=trainable,
        non_trainable_params=frozen, train_loss=kept["train_loss"], train_accuracy=kept["train_accuracy"],
        eval_loss=kept["eval_loss"], eval_accuracy=kept["eval_accuracy"], **reported,
        images_per_sec=trained.throughput.images_per_sec,
        feature_cache=ready.features.report if ready.features else None,
        skipped_examples={name: examples.skipped for name, examples in run.splits.items() if examples},
        devices=describe(run.devices),
        input={"dtype": "uint8", "height": config.image_size, "width": config.image_size,
               "channels": int(run.model.input.shape[-1])},
        trainability_audit=trainability.audit(run.model, ready.before, run.trained_variables),
        wall_seconds=time.time() - started,
    )


ARTIFACTS = ("model.keras", "backbone.weights.h5")


def _use_final_weights(run):
    """Puts the weights a finished run saves and tests into its model: the best epoch's with --keep_best
    (returns its step), then their moving averages with --ema."""
    best_step = run.checkpoints.restore_best() if run.config.keep_best else None
    if run.config.ema:
        use_averaged_weights(run.optimizer, run.trained_variables)
    return best_step


def _save_artifacts(run, run_dir):
    replace_atomic(run_dir.file("model.keras"), run.model.save)
    replace_atomic(run_dir.file("backbone.weights.h5"), run.model.get_layer(BACKBONE_LAYER).save_weights)


def describe(devices):
    return {
        "kind": devices.kind,
        "replicas": devices.num_replicas,
        "strategy": devices.strategy_name,
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
    }


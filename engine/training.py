"""`--job=train`: assemble the run, resume it, train it to the end of `--epochs`, and write what it
leaves (model.keras, backbone.weights.h5, results.json) in `--model_dir`."""

import contextlib
import math
import os
import time

from absl import logging

from transfer_engine.engine import assembly, confidence, confusion, feature_cache, inspect, loop, top_losses
from transfer_engine.engine import config as config_lib
from transfer_engine.engine.optimizer import use_averaged_weights
from transfer_engine.engine.run_dir import RunDir, replace_atomic
from transfer_engine.engine.trainer import Stages, summarize
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER


def evaluate_split(run, trainer, examples):
    """Exact loss, accuracy and per-class accuracy over every example of `examples` that decoded (None
    for no examples): the distributed evaluation of engine/trainer.py."""
    dataset = run.eval_dataset(examples)
    return summarize(trainer.evaluate(dataset), run.source.class_names) if dataset else None


def train(config, *, progress_label=""):
    """Trains (or resumes) a run in --model_dir and writes its results."""
    started = time.time()
    if config.unknown_dir:
        confidence.unknown_paths(config.unknown_dir)
    run = assembly.build(config)
    config = run.config  # With the splits the dataset decided.
    # Other workers write what the chief writes to a directory of their own (TensorFlow's convention).
    run_dir = RunDir(config.model_dir if run.devices.is_chief else
                     os.path.join(config.model_dir, f"workertemp_{run.devices.worker_index}"))
    run_dir.check_compatible(config)
    run_dir.check_same_data(run.source)
    # One run per directory at a time; other workers write directories of their own.
    with run_dir.lock() if run.devices.is_chief else contextlib.nullcontext():
        return _train(config, run, run_dir, started, progress_label)


def _train(config, run, run_dir, started, progress_label):
    restored = run.checkpoints.restore()
    finished = run_dir.read_json("results.json")
    if restored and (run.epochs_done >= config.epochs or finished.get("stopped_early")) and (
        finished.get("global_step") == int(run.state.step.numpy())
    ):
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
    if restored:
        logging.info("Resuming from %s (step %d, epoch %d)", restored, int(run.state.step.numpy()),
                     run.epochs_done + 1)
    run_dir.keep_metrics_until(run.epochs_done)
    run.checkpoints.watch_preemption(run.devices.cluster_resolver)
    logging.info(
        "What trains (mode %s%s):\n%s", config.mode,
        f", the head alone for the first {config.head_epochs} epochs" if config.head_epochs else "",
        trainability.format_table(trainability.parameter_table(run.model, run.trained_variables)),
    )
    total_steps = run.steps_per_epoch * config.epochs
    slow = trainability.slow_batchnorm_momentum(run.model, total_steps)
    if slow:
        settling = trainability.settling_momentum(total_steps)
        logging.warning(
            "BatchNorm momentum %g averages its statistics over ~%d steps, but this run has %d: "
            "evaluation will lag training (%s)", slow, round(1 / (1 - slow)), total_steps,
            f"consider --bn_momentum={settling:g} or lower" if settling else "too few steps for any momentum to settle",
        )
    if config.ema and not trainability.settles(config.ema, total_steps):
        settling = trainability.settling_momentum(total_steps)
        logging.warning(
            "--ema=%g averages the weights over ~%d steps, but this run has %d: the averages will lag the "
            "training (%s)", config.ema, round(1 / (1 - config.ema)), total_steps,
            f"consider --ema={settling:g} or lower" if settling else "too few steps for any decay to settle",
        )

    before = trainability.snapshot(run.model)
    history = [record["eval_accuracy"] for record in run_dir.metrics()]
    try:
        last, throughput, stopped = loop.train_epochs(
            schedule=loop.Schedule.of(config, run.steps_per_epoch, run.source.num_classes), stages=stages, state=run.state,
            train_dataset=run.train_dataset(splits["train"]), eval_dataset=run.eval_dataset(splits["eval"]),
            checkpoints=run.checkpoints, record_epoch=run_dir.record_epoch, progress_label=progress_label,
            history=history, patience=config.early_stopping,
            on_best=(lambda epoch: run.checkpoints.save_best()) if config.keep_best else None,
        )
    finally:
        run.checkpoints.stop_watching()
    if not last:  # Nothing left to train: report the last checkpointed epoch.
        last = run_dir.last_metrics()
    best_step = _use_final_weights(run)
    if config.keep_best:
        last = next(record for record in run_dir.metrics() if record["global_step"] == best_step)
        logging.info("Keeping the best epoch, %d of %d (eval accuracy %.4f): model.keras, backbone.weights.h5 "
                     "and the test come from it", last["epoch"], run.epochs_done, last["eval_accuracy"])
    test = evaluate_split(run, stages(run.epochs_done - 1), splits["test"])
    upper = features.upper if features else run.model
    calibrated, test_logits, test_labels = measure_confidence(
        run, run_dir, model=upper, splits=splits, step=int(run.state.step.numpy()),
        title=f"{config.mode}: confidence on {config.eval_split}")

    _save_artifacts(run, run_dir)
    trainable, frozen = trainability.parameter_counts(run.model, run.trained_variables)
    results = {
        "job": "train",
        "mode": config.mode,
        "backbone": config.backbone,
        "dataset": config.dataset,
        "class_names": list(run.source.class_names),
        "global_step": int(run.state.step.numpy()),
        "epochs_completed": run.epochs_done,
        "stopped_early": stopped,
        "best_epoch": last["epoch"] if config.keep_best else None,
        "trainable_params": trainable,
        "non_trainable_params": frozen,
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_accuracy": last["eval_accuracy"],
        "test_loss": test["loss"] if test else None,
        "test_accuracy": test["accuracy"] if test else None,
        "test_examples": test["examples"] if test else None,
        "test_class_accuracy": test["class_accuracy"] if test else None,
        "test_confusion_matrix": {"classes": list(run.source.class_names), "counts": test["confusion_matrix"]}
        if test else None,
        "calibration": calibrated,
        "images_per_sec": throughput.images_per_sec,
        "feature_cache": features.report if features else None,
        "skipped_examples": {name: examples.skipped for name, examples in run.splits.items() if examples},
        "devices": describe(run.devices),
        "input": {"dtype": "uint8", "height": config.image_size, "width": config.image_size,
                  "channels": int(run.model.input.shape[-1])},  # What model.keras takes.
        "trainability_audit": trainability.audit(run.model, before, run.trained_variables),
        "wall_seconds": time.time() - started,
    }
    if test:
        confusion.write(run_dir, test["confusion_matrix"], run.source.class_names, step=results["global_step"],
                        title=f"{config.mode}: {config.test_split} ({test['examples']:,} images)")
        results["test_top_losses"] = write_top_losses(
            run, run_dir, logits=test_logits, labels=test_labels, step=results["global_step"],
            title=f"{config.mode}: the highest losses of {config.test_split}")
    run_dir.record_hparams(config_lib.hparams(config), test, step=results["global_step"])
    run_dir.write_json("results.json", results)
    logging.info(
        "Done: test accuracy %s, eval accuracy %s, %s images/sec; results in %s",
        fmt(results["test_accuracy"]), fmt(results["eval_accuracy"]),
        fmt(results["images_per_sec"], ".0f"), run_dir.file("results.json"),
    )
    return results


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


def write_top_losses(run, run_dir, *, logits, labels, step, title):
    """top_losses.png of the run's test split (engine/top_losses.py) from its `logits`; the mistakes as
    results.json lists them."""
    test, classes = run.splits["test"], run.source.class_names
    # Example names follow the split as read: exact with one reader and nothing skipped; else the position.
    name = ((lambda index: run.source.example_name(test.split.name, index))
            if run.worker.count == 1 and not test.skipped else None)
    mistakes = top_losses.write(run_dir, logits=logits, labels=labels, shown_from=test, class_names=classes,
                                step=step, title=title, names=name)
    return [{"example": name(m.index) if name else m.index, "label": classes[m.label], "predicted": classes[m.predicted],
             "probability": m.probability, "loss": m.loss} for m in mistakes]


def measure_confidence(run, run_dir, *, model, splits, step, title):
    """The logits of the eval and test splits (`model` on `splits`: images, or cached features with the
    model above the cut) and of --unknown_dir's images; results.json's "calibration" (None without an eval
    split) and coverage.png (engine/confidence.py). Returns (calibration, test logits, test labels)."""
    config = run.config
    logits = {name: confidence.logits_of(model, splits[name].dataset, batch_size=config.batch_size, tta=config.tta)
              if splits[name] else (None, None) for name in ("eval", "test")}
    if logits["eval"][0] is None or not len(logits["eval"][0]):
        return None, *logits["test"]
    unknown = None
    if config.unknown_dir:
        images = confidence.unknown_images(config.unknown_dir, image_size=config.image_size,
                                           channels=int(run.model.input.shape[-1]), max_pixels=config.max_image_pixels)
        unknown = confidence.logits_of(run.model, images, batch_size=config.batch_size, tta=config.tta)[0]
    report = confidence.measure(
        eval_logits=logits["eval"][0], eval_labels=logits["eval"][1], test_logits=logits["test"][0],
        test_labels=logits["test"][1], unknown_logits=unknown, target_accuracy=config.target_accuracy,
        min_confidence=config.min_confidence)
    confidence.write(run_dir, report, step=step, title=title, eval_logits=logits["eval"][0],
                     eval_labels=logits["eval"][1], unknown_logits=unknown)
    logging.info("Calibration: temperature %.3g fitted on %d eval images; expected calibration error %s",
                 report["temperature"], report["fitted_on_eval_examples"], "; ".join(
                     f"{name} {report[name]['ece_before']:.4f} -> {report[name]['ece_after']:.4f}"
                     for name in ("eval", "test") if name in report))
    if config.target_accuracy is not None and report["threshold"] is None:
        logging.warning("--target_accuracy=%g: no confidence threshold reaches it on the eval split", config.target_accuracy)
    elif report["threshold"] is not None:
        kept = report["at_threshold"]
        logging.info("Confidence threshold %.4f%s: accepts %s", report["threshold"],
                     f" (--target_accuracy={config.target_accuracy:g})" if config.target_accuracy is not None else "",
                     "; ".join(f"{name} {row['coverage']:.1%} of images at accuracy {fmt(row['accuracy'])}"
                               for name, row in kept.items()) + (
                         f"; rejects {report['unknown']['rejected']:.1%} of --unknown_dir's "
                         f"{report['unknown']['images']} images" if "unknown" in report else "") +
                     f"; give it to predict as --min_confidence={math.floor(report['threshold'] * 1e4) / 1e4:.4f}")
    return report, *logits["test"]


def describe(devices):
    return {
        "kind": devices.kind,
        "replicas": devices.num_replicas,
        "strategy": devices.strategy_name,
        "precision": devices.precision,
        "jit_compile": devices.jit_compile,
    }


def fmt(value, spec=".4f"):
    return "-" if value is None else format(value, spec)

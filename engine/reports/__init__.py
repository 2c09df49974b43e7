"""What a finished run reports, as one list: each report reads the final model's predictions
(engine/reports/predictions.py), writes its files in the run directory and returns its entries of the results.

`--job=train` (results.json) and `--job=evaluate` (evaluation.json) call the same list on the same kind of
predictions, so evaluate writes everything train writes, under the same names. A new report is a function
of `Finished` returning a dict, and an entry in DEFAULT. Tests that check no picture pass an empty list.
"""

import dataclasses
import functools
import math

from absl import logging

from transfer_engine.engine import config as config_lib
from transfer_engine.engine.reports import confidence, confusion, top_losses


@dataclasses.dataclass(frozen=True)
class Finished:
    """What the reports read: the run (engine/core/assembly.py), its directory, the predictions per split."""

    run: object
    run_dir: object  # engine/core/run_dir.py's RunDir.
    predictions: dict  # {"eval": Predictions or None, "test": ...}
    step: int
    measured: tuple = ("test",)  # The splits whose loss, accuracy, per-class figures go in the results.

    @property
    def config(self):
        return self.run.config

    @property
    def class_names(self):
        return list(self.run.source.class_names)

    def title(self, text):
        return f"{self.config.mode}: {text}"

    @functools.cached_property
    def metrics(self):
        """{split: its loss, accuracy, per-class accuracy and confusion matrix (Predictions.metrics), or None},
        computed once for every report that reads them."""
        return {name: predictions.metrics(self.class_names) if predictions else None
                for name, predictions in self.predictions.items()}


def split_metrics(done):
    """{eval,test}_{loss, accuracy, examples, class_accuracy} of the measured splits (None without one)."""
    results = {}
    for name in done.measured:
        metrics = done.metrics[name] or {}
        for key in ("loss", "accuracy", "examples", "class_accuracy"):
            results[f"{name}_{key}"] = metrics.get(key)
    return results


def confusion_matrix(done):
    """confusion.png of the test split; {split}_confusion_matrix of each measured split."""
    results = {}
    for name in done.measured:
        predictions = done.predictions[name]
        counts = done.metrics[name]["confusion_matrix"] if predictions else None
        results[f"{name}_confusion_matrix"] = {"classes": done.class_names, "counts": counts} if predictions else None
        if predictions and name == "test":
            confusion.write(done.run_dir, counts, done.class_names, step=done.step,
                            title=done.title(f"{predictions.split} ({len(predictions.labels):,} images)"))
    return results


def highest_losses(done):
    """top_losses.png of the test split (this worker's examples: it draws them), and its list."""
    test, run = done.predictions["test"], done.run
    if not test:
        return {}
    # Example names follow the split as read: exact with one reader and nothing skipped; else the position.
    name = ((lambda index: run.source.example_name(test.examples.split.name, index))
            if run.worker.count == 1 and not test.examples.skipped else None)
    logits, labels = test.own()
    mistakes = top_losses.write(done.run_dir, logits=logits, labels=labels, shown_from=test.examples,
                                class_names=done.class_names, step=done.step, names=name,
                                title=done.title(f"the highest losses of {test.split}"))
    classes = done.class_names
    return {"test_top_losses": [
        {"example": name(m.index) if name else m.index, "label": classes[m.label], "predicted": classes[m.predicted],
         "probability": m.probability, "loss": m.loss} for m in mistakes]}


def calibration(done):
    """"calibration" (None without eval examples) and coverage.png: engine/reports/confidence.py, from the eval
    split (the temperature), the test split and --unknown_dir's images."""
    config, run = done.config, done.run
    evaluated, test = done.predictions["eval"], done.predictions["test"]
    if not evaluated or not len(evaluated.labels):
        return {"calibration": None}
    unknown = None
    if config.unknown_dir:
        images = confidence.unknown_images(config.unknown_dir, image_size=config.image_size,
                                           channels=int(run.model.input.shape[-1]), max_pixels=config.max_image_pixels)
        unknown = confidence.logits_of(run.model, images, batch_size=config.batch_size, tta=config.tta)[0]
    report = confidence.measure(
        eval_logits=evaluated.logits, eval_labels=evaluated.labels, test_logits=test.logits if test else None,
        test_labels=test.labels if test else None, unknown_logits=unknown, target_accuracy=config.target_accuracy,
        min_confidence=config.min_confidence)
    confidence.write(done.run_dir, report, step=done.step, title=done.title(f"confidence on {evaluated.split}"),
                     eval_logits=evaluated.logits, eval_labels=evaluated.labels, unknown_logits=unknown)
    _log_calibration(report, config)
    return {"calibration": report}


def _log_calibration(report, config):
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


def hparams(done):
    """The run as a row of TensorBoard's HParams table, with the test split's loss and accuracy."""
    done.run_dir.record_hparams(config_lib.hparams(done.config), done.metrics["test"], step=done.step)
    return {}


DEFAULT = (split_metrics, confusion_matrix, highest_losses, calibration, hparams)


def write(reports, done):
    """Runs each report in order; their results entries, merged."""
    results = {}
    for report in reports:
        results.update(report(done))
    return results


def fmt(value, spec=".4f"):
    return "-" if value is None else format(value, spec)

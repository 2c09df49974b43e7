"""What a trained model's confidence means (issue 29): after training, one temperature fitted on the eval
split (engine/maths/calibration.py), the calibration error before and after on eval and test, the eval split's
risk-coverage curve (coverage.png: how accurate the images above a confidence threshold are, and how many
they are), the threshold reaching --target_accuracy, and with --unknown_dir the share of images of none of
the classes that such a threshold rejects. results.json keeps it under "calibration"; --job=predict divides
the logits by the temperature and answers `unknown` below --min_confidence.

The logits come from one inference pass per split in the model's inference mode (on the cached features
where the run has them, as top_losses.png's do); a one-logit (sigmoid) model's z becomes the two logits
(0, z), whose softmax is (1 - sigmoid(z), sigmoid(z)), so one temperature serves both kinds.
"""

import numpy as np
import tensorflow as tf

from transfer_engine.data import pipeline
from transfer_engine.data.sources import files_below, is_image
from transfer_engine.engine.maths import calibration
from transfer_engine.engine.reports import figures
from transfer_engine.engine.core.steps import flip_averaged
from transfer_engine.errors import ConfigError

CURVE_POINTS = 101  # results.json's risk-coverage curve: every 1% of coverage.


def two_or_more(logits):
    """[n, classes] logits, a sigmoid's z as (0, z)."""
    logits = np.asarray(logits, np.float64)
    return np.concatenate([np.zeros_like(logits), logits], axis=1) if logits.shape[1] == 1 else logits


def logits_of(model, dataset, *, batch_size, tta=False):
    """(logits [n, classes >= 2], labels or None) of a dataset of images (or of (images, labels))."""
    call = lambda batch: tf.cast(model(batch, training=False), tf.float32)
    found, labels = [], []
    for element in dataset.batch(batch_size):
        images, label = element if isinstance(element, tuple) else (element, None)
        found.append((flip_averaged(call, images) if tta else call(images)).numpy())
        if label is not None:
            labels.append(label.numpy())
    logits = two_or_more(np.concatenate(found)) if found else np.zeros((0, 2))
    return logits, np.concatenate(labels).astype(np.int64) if labels else None


def unknown_paths(folder):
    """The image files below --unknown_dir (checked before training, so a wrong folder costs no run)."""
    paths = sorted(path for path in files_below(folder) if is_image(path))
    if not paths:
        raise ConfigError("unknown_dir", folder, "holds no image file (JPEG, PNG, BMP or GIF)")
    return paths


def unknown_images(folder, *, image_size, channels, max_pixels):
    """The decodable images below `folder` (any class: they are to be rejected), as a dataset."""
    paths = unknown_paths(folder)
    return tf.data.Dataset.from_tensor_slices(np.array([p.encode("utf-8", "surrogateescape") for p in paths], object)).map(
        lambda path: pipeline.decode(tf.io.read_file(path), image_size=image_size, channels=channels,
                                     max_pixels=max_pixels)).ignore_errors()


def measure(*, eval_logits, eval_labels, test_logits=None, test_labels=None, unknown_logits=None,
            target_accuracy=None, min_confidence=0.0):
    """The "calibration" entry of results.json from the logits of the eval split (fits the temperature),
    the test split (measured with it, unseen by the fit) and images of no class."""
    temperature = calibration.fit_temperature(eval_logits, eval_labels)
    report = {"temperature": temperature, "fitted_on_eval_examples": len(eval_labels)}
    for name, logits, labels in (("eval", eval_logits, eval_labels), ("test", test_logits, test_labels)):
        if logits is None or not len(logits):
            continue
        before, after = calibration.softmax(logits), calibration.softmax(logits / temperature)
        report[name] = {
            "nll_before": calibration.negative_log_likelihood(logits, labels),
            "nll_after": calibration.negative_log_likelihood(logits, labels, temperature),
            "ece_before": calibration.expected_calibration_error(before, labels),
            "ece_after": calibration.expected_calibration_error(after, labels),
        }
    curve = calibration.risk_coverage(calibration.softmax(eval_logits / temperature), eval_labels)
    report["eval_coverage"] = curve.sampled(CURVE_POINTS)
    threshold = min_confidence or None
    if target_accuracy is not None:
        threshold = curve.threshold_for(target_accuracy)
        report["target_accuracy"] = target_accuracy
    report["threshold"] = threshold
    if threshold is not None:
        report["at_threshold"] = {}
        for name, logits, labels in (("eval", eval_logits, eval_labels), ("test", test_logits, test_labels)):
            if logits is not None and len(logits):
                report["at_threshold"][name] = calibration.accepted(
                    calibration.softmax(logits / temperature), labels, threshold)
    if unknown_logits is not None and len(unknown_logits):
        confidence = calibration.softmax(unknown_logits / temperature).max(axis=1)
        report["unknown"] = {"images": len(confidence), "median_confidence": float(np.median(confidence)),
                             "rejected": None if threshold is None else float(np.mean(confidence < threshold))}
    return report


def figure(report, *, eval_logits, eval_labels, unknown_logits=None, title):
    """coverage.png: left, accuracy of the accepted eval images against the share accepted; right, against
    the confidence threshold, the share of eval images accepted and of unknown images rejected."""
    temperature = report["temperature"]
    probabilities = calibration.softmax(eval_logits / temperature)
    curve = calibration.risk_coverage(probabilities, eval_labels)
    drawing, (left, right) = figures.new(columns=2, figsize=(10, 4.2), layout="constrained")
    left.plot(curve.coverage, curve.accuracy, color="tab:blue")
    left.set_xlabel("share of eval images accepted (coverage)")
    left.set_ylabel("accuracy of the accepted images")
    left.set_xlim(0, 1)
    left.grid(alpha=0.3)
    thresholds = np.linspace(0, 1, 201)
    confidence = probabilities.max(axis=1)
    right.plot(thresholds, [np.mean(confidence >= t) for t in thresholds], label="eval images accepted")
    right.plot(thresholds, [calibration.accepted(probabilities, eval_labels, t)["accuracy"] or np.nan
                            for t in thresholds], label="accuracy of those accepted")
    if unknown_logits is not None and len(unknown_logits):
        unknown = calibration.softmax(unknown_logits / temperature).max(axis=1)
        right.plot(thresholds, [np.mean(unknown < t) for t in thresholds],
                   label=f"unknown images rejected ({len(unknown)})")
    if report.get("threshold") is not None:
        for axis, x in ((right, report["threshold"]), (left, report["at_threshold"]["eval"]["coverage"])):
            axis.axvline(x, color="gray", linestyle="--", linewidth=1)
        right.text(report["threshold"], 0.02, f" {report['threshold']:.3f}", color="gray")
    right.set_xlabel(f"calibrated confidence threshold (temperature {temperature:.3g})")
    right.set_xlim(0, 1)
    right.set_ylim(0, 1.02)
    right.grid(alpha=0.3)
    right.legend(fontsize=8, loc="lower left")
    drawing.suptitle(figures.printable(title), fontsize=10)
    return drawing


def write(run_dir, report, *, step, title, **logits):
    figures.save(run_dir, figure(report, title=title, **logits), "coverage.png", tag="coverage", step=step, dpi=90)

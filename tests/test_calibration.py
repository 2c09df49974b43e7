"""engine/maths/calibration.py: a temperature that undoes over-confidence, the calibration error it lowers, and
the risk-coverage curve's threshold for a target accuracy."""

import numpy as np
import pytest

from transfer_engine.engine.maths import calibration


def _calibrated_logits(rng, count=4000, classes=5):
    """Logits whose softmax is calibrated by construction: labels drawn from it."""
    logits = rng.normal(0, 1.5, (count, classes))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


def test_an_over_confident_model_gets_its_temperature_back_and_its_calibration_error_falls():
    rng = np.random.default_rng(0)
    logits, labels = _calibrated_logits(rng)
    over = logits * 4.0  # The same ranking, four times too sure.
    temperature = calibration.fit_temperature(over, labels)
    assert abs(temperature - 4.0) < 0.3, temperature
    softmax = lambda z: np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)
    before = calibration.expected_calibration_error(softmax(over), labels)
    after = calibration.expected_calibration_error(softmax(over / temperature), labels)
    assert before > 0.15 and after < 0.03, (before, after)
    assert calibration.negative_log_likelihood(over, labels, temperature) < calibration.negative_log_likelihood(over, labels)
    assert (softmax(over / temperature).argmax(1) == over.argmax(1)).all()  # Accuracy untouched.


def test_an_under_confident_model_gets_a_temperature_below_one():
    rng = np.random.default_rng(1)
    logits, labels = _calibrated_logits(rng)
    assert abs(calibration.fit_temperature(logits / 3.0, labels) - 1 / 3.0) < 0.05


def test_the_risk_coverage_curve_and_its_threshold():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 0, 1, 1, 1])  # Right, right, right, wrong, wrong (by confidence: .9 .8 .7 .6 .55).
    curve = calibration.risk_coverage(probabilities, labels)
    np.testing.assert_allclose(curve.thresholds, [0.9, 0.8, 0.7, 0.6, 0.55])
    np.testing.assert_allclose(curve.coverage, [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(curve.accuracy, [1, 1, 1, 0.75, 0.6])
    assert curve.threshold_for(1.0) == 0.7 and curve.threshold_for(0.75) == 0.6
    assert curve.threshold_for(0.5) == 0.55
    assert calibration.risk_coverage(probabilities, 1 - labels).threshold_for(0.99) is None
    assert calibration.accepted(probabilities, labels, 0.7) == {"coverage": 0.6, "accepted": 3, "accuracy": 1.0}
    assert calibration.accepted(probabilities, labels, 0.95) == {"coverage": 0.0, "accepted": 0, "accuracy": None}
    sampled = curve.sampled(11)  # Coverages .1, .2, ..., 1: each at the least coverage of the curve reaching it.
    assert sampled["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert sampled["threshold"] == [0.9, 0.8, 0.7, 0.6, 0.55] and sampled["accuracy"] == [1, 1, 1, 0.75, 0.6]


def test_a_sigmoid_models_logit_calibrates_as_two_softmax_logits():
    from transfer_engine.engine.reports import confidence

    z = np.array([[2.0], [-1.0]])
    two = confidence.two_or_more(z)
    np.testing.assert_allclose(calibration.softmax(two)[:, 1], 1 / (1 + np.exp(-z[:, 0])))
    np.testing.assert_allclose(calibration.softmax(two / 2)[:, 1], 1 / (1 + np.exp(-z[:, 0] / 2)))


def test_calibration_error_bins_and_ties_at_their_edges():
    # Confidences 0.9 and 0.99 fall in different bins of 15: (|0.9 - 1| + |0.99 - 0|) / 2.
    assert calibration.expected_calibration_error([[.9, .1], [.99, .01]], [0, 1]) == pytest.approx(0.545)
    # Equal confidences are accepted together: one point of the curve for both.
    curve = calibration.risk_coverage([[.9, .1], [.9, .1], [.6, .4]], [0, 1, 0])
    np.testing.assert_allclose(curve.thresholds, [.9, .6])
    np.testing.assert_allclose(curve.coverage, [2 / 3, 1])
    np.testing.assert_allclose(curve.accuracy, [.5, 2 / 3])
    five = calibration.risk_coverage(np.array([[.9, .1], [.8, .2], [.7, .3], [.6, .4], [.55, .45]]), [0] * 5)
    assert five.sampled(6)["coverage"] == [0.2, 0.4, 0.6, 0.8, 1.0]  # A point exactly at each wanted coverage.


def test_the_temperature_comes_from_the_eval_split_alone():
    """measure() fits on eval and only measures test: test logits four times less sure change nothing."""
    from transfer_engine.engine.reports import confidence

    rng = np.random.default_rng(2)
    logits, labels = _calibrated_logits(rng)
    report = confidence.measure(eval_logits=logits * 4, eval_labels=labels, test_logits=logits, test_labels=labels)
    assert abs(report["temperature"] - 4.0) < 0.3
    assert report["test"]["ece_after"] > report["test"]["ece_before"]  # Test was calibrated already: T hurts it.
    assert report["threshold"] is None and "unknown" not in report


def test_unknown_is_below_min_confidence_not_at_it():
    from transfer_engine.engine.jobs.predict import answer

    assert answer(["a", "b"], [0.5, 0.5], 0.5) == "a"
    assert answer(["a", "b"], [0.4999, 0.5001], 0.5) == "unknown"
    assert answer(["a", "b"], [0.2, 0.1], 0.0) == "a"  # 0: never unknown.

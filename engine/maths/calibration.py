"""Calibrated confidence (issue 29, groundwork): one temperature fitted on the eval split's logits, the
expected calibration error before and after, and the risk-coverage curve that picks a confidence threshold
for answering "unknown". Pure numpy on logits an exact evaluation already gathered.

Temperature scaling (Guo et al., 2017) divides every logit by one T > 0: the predicted class never
changes, so accuracy and the exported artifacts' parity are untouched, while the probabilities stop
claiming more (or less) certainty than the model has. T is fitted by minimising the eval split's negative
log-likelihood, which is convex in 1/T: Newton's method on 1/T converges in a few steps.
"""

import dataclasses

import numpy as np

ECE_BINS = 15  # The usual number of equal-width confidence bins.


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def cross_entropy(logits, labels, temperature=1.0):
    """Each example's negative log-likelihood of its label under softmax(logits / temperature)."""
    scaled = np.asarray(logits, np.float64) / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return log_z - shifted[np.arange(len(labels)), labels]


def negative_log_likelihood(logits, labels, temperature=1.0):
    return float(np.mean(cross_entropy(logits, labels, temperature)))


def fit_temperature(logits, labels, *, steps=50, tolerance=1e-10):
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T) on `labels`.

    Newton on b = 1/T: d/db NLL = E_p[z] - z_label, d2/db2 = Var_p[z] >= 0 (p = softmax(b z)); a step that
    would not lower the NLL is halved. Logits that separate the labels perfectly have no finite optimum:
    T then shrinks until the step stalls, which is what "more confident" means there."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    picked = logits[np.arange(len(labels)), labels]
    inverse = 1.0
    loss = negative_log_likelihood(logits, labels, 1.0)
    for _ in range(steps):
        p = softmax(inverse * logits)
        mean = (p * logits).sum(axis=1)
        gradient = np.mean(mean - picked)
        curvature = np.mean((p * logits ** 2).sum(axis=1) - mean ** 2)
        step = gradient / curvature if curvature > 1e-12 else np.sign(gradient) * 0.5 * inverse
        while True:
            candidate = inverse - step
            if candidate > 0:
                candidate_loss = negative_log_likelihood(logits, labels, 1.0 / candidate)
                if candidate_loss <= loss:
                    break
            step /= 2
            if abs(step) < 1e-12:
                return 1.0 / inverse
        converged = loss - candidate_loss < tolerance
        inverse, loss = candidate, candidate_loss
        if converged:
            break
    return 1.0 / inverse


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """The average gap between confidence and accuracy over equal-width confidence bins, weighted by how
    many predictions fall in each (0: confidence means what it says)."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(error)


@dataclasses.dataclass(frozen=True)
class RiskCoverage:
    """Accepting the predictions whose confidence is at least `thresholds[i]` covers `coverage[i]` of the
    examples with accuracy `accuracy[i]` (thresholds descending, coverage ascending)."""

    thresholds: np.ndarray
    coverage: np.ndarray
    accuracy: np.ndarray

    def threshold_for(self, target_accuracy):
        """The lowest threshold (the most coverage) whose accepted predictions reach `target_accuracy`;
        None if none does."""
        reaching = np.flatnonzero(self.accuracy >= target_accuracy)
        return float(self.thresholds[reaching[-1]]) if len(reaching) else None

    def sampled(self, points):
        """The curve at `points` evenly spaced coverages (for results.json): at each, the point of the
        curve with the least coverage reaching it."""
        wanted = np.linspace(0, 1, points)[1:]
        at = np.minimum(np.searchsorted(self.coverage, wanted - 1e-12), len(self.coverage) - 1)
        at = np.unique(at)
        return {"threshold": [round(float(x), 6) for x in self.thresholds[at]],
                "coverage": [round(float(x), 6) for x in self.coverage[at]],
                "accuracy": [round(float(x), 6) for x in self.accuracy[at]]}


def risk_coverage(probabilities, labels):
    """The risk-coverage curve of confidence thresholds, one point per distinct confidence."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-confidence, kind="stable")
    confidence, correct = confidence[order], correct[order]
    last = np.r_[confidence[1:] != confidence[:-1], True]  # The last of each run of equal confidences.
    accepted = np.arange(1, len(confidence) + 1)[last]
    return RiskCoverage(thresholds=confidence[last], coverage=accepted / len(confidence),
                        accuracy=np.cumsum(correct)[last] / accepted)


def accepted(probabilities, labels, threshold):
    """What a confidence threshold keeps: the share of examples whose top probability reaches it, and
    their accuracy (None when none does)."""
    probabilities = np.asarray(probabilities, np.float64)
    keep = probabilities.max(axis=1) >= threshold
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    return {"coverage": float(keep.mean()) if len(keep) else 0.0, "accepted": int(keep.sum()),
            "accuracy": float(correct[keep].mean()) if keep.any() else None}

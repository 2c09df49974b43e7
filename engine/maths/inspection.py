"""Inspection of a dataset before (or without) training (issue 29, groundwork): duplicate pairs, exact
(the same decoded pixels) and near (cosine similarity of the frozen backbone's pooled features), and
suspect labels (out-of-fold predictions of a linear classifier on those features that contradict the given
label, as confident learning ranks them). Pure numpy over features the feature cache already computes."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pair:
    a: int
    b: int
    similarity: float


def exact_duplicates(digests):
    """Pairs (a < b) of examples whose decoded pixels hash the same, similarity 1.0."""
    first = {}
    pairs = []
    for index, digest in enumerate(digests):
        for earlier in first.get(digest, ()):
            pairs.append(Pair(earlier, index, 1.0))
        first.setdefault(digest, []).append(index)
    return pairs


def near_duplicates(features, threshold, *, block=2048):
    """Pairs (a < b) whose features' cosine similarity is at least `threshold`, most similar first, as three
    arrays (a, b, similarity): millions of pairs stay cheap. Computed a block of rows at a time, so memory
    stays at block x N."""
    features = np.asarray(features, np.float32)
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    found = [], [], []
    for start in range(0, len(unit), block):
        similarity = unit[start:start + block] @ unit.T
        rows, columns = np.nonzero(similarity >= threshold)
        keep = columns > rows + start
        rows, columns = rows[keep], columns[keep]
        for part, values in zip(found, (rows + start, columns, similarity[rows, columns])):
            part.append(values)
    a, b, similarity = (np.concatenate(part) if part else np.zeros(0) for part in found)
    order = np.argsort(-similarity, kind="stable")
    return a[order].astype(np.int64), b[order].astype(np.int64), similarity[order].astype(np.float64)


def out_of_fold_probabilities(features, labels, num_classes, *, folds=5, seed=0, l2=1e-3, steps=300,
                              learning_rate=0.1):
    """Each example's class probabilities from a multinomial logistic regression trained on the other
    folds (standardised features, full-batch gradient descent with L2): what the features say of an
    example's class without having seen its label."""
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels)
    order = np.random.default_rng(seed).permutation(len(labels))
    probabilities = np.zeros((len(labels), num_classes))
    for fold in range(folds):
        held = order[fold::folds]
        train = np.setdiff1d(order, held)
        mean, scale = features[train].mean(0), features[train].std(0) + 1e-6
        x = (features[train] - mean) / scale
        onehot = np.eye(num_classes)[labels[train]]
        weights, bias = np.zeros((x.shape[1], num_classes)), np.zeros(num_classes)
        for _ in range(steps):
            logits = x @ weights + bias
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            error = (p - onehot) / len(x)
            weights -= learning_rate * (x.T @ error + l2 * weights)
            bias -= learning_rate * error.sum(0)
        logits = ((features[held] - mean) / scale) @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        probabilities[held] = p / p.sum(1, keepdims=True)
    return probabilities


@dataclasses.dataclass(frozen=True)
class Suspect:
    index: int
    label: int
    suggested: int
    # ln(P(suggested) / P(label)): > 0 when the features favour another class, by how much (probabilities
    # near 0 and 1 keep their order here, where their difference would tie at 1.00).
    score: float


def suspect_labels(probabilities, labels):
    """Every example ranked by how strongly its out-of-fold probabilities contradict its label, most
    suspect first."""
    log_p = np.log(np.maximum(np.asarray(probabilities, np.float64), 1e-300))
    labels = np.asarray(labels)
    given = log_p[np.arange(len(labels)), labels]
    others = log_p.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    suggested = others.argmax(1)
    scores = others.max(1) - given
    order = np.argsort(-scores, kind="stable")
    return [Suspect(int(i), int(labels[i]), int(suggested[i]), float(scores[i])) for i in order]

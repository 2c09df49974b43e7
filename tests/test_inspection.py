"""engine/inspection.py: planted duplicates are all found; flipped labels rank among the top suspects."""

import numpy as np

from transfer_engine.engine import inspection


def _clusters(rng, per_class=200, classes=4, dim=32):
    centres = rng.normal(0, 3, (classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    return centres[labels] + rng.normal(0, 1.5, (len(labels), dim)), labels


def test_planted_near_and_exact_duplicates_are_all_found_and_nothing_else():
    rng = np.random.default_rng(0)
    features, _ = _clusters(rng)
    copies = [(3, 700), (10, 401), (250, 799)]
    for a, b in copies:
        features[b] = features[a] * 1.01 + rng.normal(0, 0.01, features.shape[1])  # A re-encoded copy.
    found = inspection.near_duplicates(features, threshold=0.995, block=128)
    assert {(pair.a, pair.b) for pair in found} == set(copies)
    assert all(pair.similarity >= 0.995 for pair in found)
    digests = ["x"] * 3 + [str(i) for i in range(3, 10)]
    assert [(p.a, p.b) for p in inspection.exact_duplicates(digests)] == [(0, 1), (0, 2), (1, 2)]


def test_most_flipped_labels_are_among_the_top_suspects():
    rng = np.random.default_rng(1)
    features, labels = _clusters(rng)
    flipped = rng.choice(len(labels), size=len(labels) // 20, replace=False)  # 5% of the labels.
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 4, len(flipped))) % 4
    probabilities = inspection.out_of_fold_probabilities(features, noisy, 4)
    suspects = inspection.suspect_labels(probabilities, noisy)
    top = {suspect.index for suspect in suspects[:len(flipped)]}
    precision = len(top & set(flipped)) / len(flipped)
    assert precision >= 0.8, precision
    by_index = {suspect.index: suspect for suspect in suspects}
    assert np.mean([by_index[i].suggested == labels[i] for i in flipped]) >= 0.8  # The true class suggested.

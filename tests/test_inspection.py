"""engine/maths/inspection.py: planted duplicates are all found; flipped labels rank among the top suspects."""

from dataclasses import replace
import json
import os

import numpy as np
import pytest

from transfer_engine.engine.maths import inspection


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
    a, b, similarity = inspection.near_duplicates(features, threshold=0.995, block=128)
    assert set(zip(a.tolist(), b.tolist())) == set(copies) and len(a) == len(copies)
    assert (similarity >= 0.995).all() and (np.diff(similarity) <= 0).all()
    digests = ["x"] * 3 + [str(i) for i in range(3, 10)]
    assert [(p.a, p.b) for p in inspection.exact_duplicates(digests)] == [(0, 1), (0, 2), (1, 2)]


def test_out_of_fold_probabilities_never_see_the_label_they_predict():
    """On features that say nothing of random labels, held-out predictions are at chance (a fold that
    trained on its own examples would memorise them: 1.0 measured)."""
    rng = np.random.default_rng(3)
    features, labels = rng.normal(size=(100, 200)), rng.integers(0, 4, 100)
    probabilities = inspection.out_of_fold_probabilities(features, labels, 4)
    assert np.mean(probabilities.argmax(1) == labels) < 0.4


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


def _fashion_folder(root, labels, per_class, rng):
    """A folder dataset of Fashion-MNIST PNGs, `per_class` of each of `labels` (classes named by label);
    returns {path: class}."""
    import tensorflow as tf

    from transfer_engine.data import fashion_mnist_idx

    folder = fashion_mnist_idx.DEBIAN_DIR
    images = fashion_mnist_idx.read_idx(f"{folder}/train-images-idx3-ubyte.gz", 2051, None)
    all_labels = fashion_mnist_idx.read_idx(f"{folder}/train-labels-idx1-ubyte.gz", 2049, None)
    written = {}
    for label in labels:
        (root / f"c{label}").mkdir(parents=True)
        for n, index in enumerate(np.flatnonzero(all_labels == label)[:per_class]):
            path = root / f"c{label}" / f"{n:03d}.png"
            path.write_bytes(tf.io.encode_png(images[index]).numpy())
            written[str(path)] = f"c{label}"
    return written


@pytest.mark.slow  # Extracts MobileNetV2 features of 300 images, twice (about 20 s).
def test_inspect_reports_every_planted_copy_and_ranks_flipped_labels_first(tiny, tmp_path, caplog):
    import csv
    import shutil

    import tensorflow as tf

    from transfer_engine.engine.jobs import inspect, training

    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    written = _fashion_folder(root, (1, 7, 8), 95, rng)  # Trouser, Sneaker, Bag.
    originals = sorted(written)
    copies = {}
    for n, source in enumerate(rng.choice(originals, 10, replace=False)):  # Copied as files, renamed.
        copies[source] = os.path.join(os.path.dirname(source), f"copy{n}.png")
        shutil.copy(source, copies[source])
    for n, source in enumerate(rng.choice([p for p in originals if p not in copies], 5, replace=False)):
        target = os.path.join(os.path.dirname(source), f"resaved{n}.jpg")  # Saved again as a JPEG.
        with open(source, "rb") as f:
            pixels = tf.io.decode_png(f.read())
        with open(target, "wb") as f:
            f.write(tf.io.encode_jpeg(pixels, quality=95).numpy())
        copies[source] = target
    flipped = rng.choice([p for p in originals if p not in copies], 15, replace=False)  # 5% of 300.
    for n, path in enumerate(flipped):  # Moved to another class's folder.
        other = [c for c in ("c1", "c7", "c8") if c != written[path]][n % 2]
        target = os.path.join(root, other, "moved_" + os.path.basename(path))
        os.rename(path, target)
        written[target] = written.pop(path)
    config = tiny(dataset=f"folder:{root}", label_subset=(), backbone="mobilenet_v2", alpha=0.35, image_size=96,
                  weights="models/pretrained/mobilenet_v2_0.35_96_fmnist7.weights.h5", train_split="train[:80%]",
                  eval_split="train[80%:90%]", test_split="train[90%:]", model_dir=str(tmp_path / "run"), job="inspect")
    summary = inspect.inspect(config)
    with open(tmp_path / "run" / "duplicates.csv") as f:
        pairs = list(csv.DictReader(f))
    found = {frozenset((row["path_a"], row["path_b"])) for row in pairs}
    for source, copy in copies.items():
        assert frozenset((source, copy)) in found, (source, copy)
    planted_across = sum(1 for row in pairs if frozenset((row["path_a"], row["path_b"])) in
                         {frozenset(pair) for pair in copies.items()} and row["split_a"] != row["split_b"])
    assert summary["exact_pairs"] >= 10 and planted_across > 0
    assert summary["duplicate_pairs"] == len(pairs) <= 20  # The planted 15, and few if any of the originals.
    assert summary["cross_split_pairs"] == sum(row["split_a"] != row["split_b"] for row in pairs)
    with open(tmp_path / "run" / "suspect_labels.csv") as f:
        suspects = list(csv.DictReader(f))
    moved = {row["path"] for row in suspects if os.path.basename(row["path"]).startswith("moved_")}
    top = [row["path"] for row in suspects[:len(moved)]]
    precision = len(moved & set(top)) / len(moved)
    print(f"\n{summary['duplicate_pairs']} pairs at {summary['near_duplicate']:.4f}; {len(moved)} flipped labels "
          f"in train, precision of the top {len(moved)} suspects {precision:.2f}")
    assert precision >= 0.7
    assert os.path.getsize(tmp_path / "run" / "inspect.png") > 10_000

    # A train run in that directory, on the same data and splits, warns of the cross-split duplicates.
    trained = replace(config, job="train", backbone="small_cnn", alpha=1.0, image_size=32, weights="none")
    with caplog.at_level("WARNING"):
        training.train(trained)
    assert f"--job=inspect found {summary['cross_split_pairs']} duplicate pairs across this run's splits" in caplog.text
    # Not when the folder changed since inspect ran (its findings are of other data).
    caplog.clear()
    found = json.loads((tmp_path / "run" / "inspect.json").read_text())
    (tmp_path / "run" / "inspect.json").write_text(json.dumps({**found, "contents": "other"}))
    with caplog.at_level("WARNING"):
        training.train(replace(trained, epochs=2))
    assert "--job=inspect found" not in caplog.text

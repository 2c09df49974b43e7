"""Calibrated confidence and "unknown" (issue 29): a trained run's temperature, its risk-coverage threshold,
a held-out class rejected as unknown, and predict answering with the same calibrated probabilities."""

import csv
from dataclasses import replace
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.data import fashion_mnist_idx


def _class_folder(folder, label, count):
    """`count` PNGs of Fashion-MNIST class `label` from the second half of its test set (the splits below
    use the first 4,000 test images only)."""
    images = fashion_mnist_idx.read_idx(os.path.join(fashion_mnist_idx.DEBIAN_DIR, "t10k-images-idx3-ubyte.gz"), 2051, None)
    labels = fashion_mnist_idx.read_idx(os.path.join(fashion_mnist_idx.DEBIAN_DIR, "t10k-labels-idx1-ubyte.gz"), 2049, None)
    folder.mkdir()
    for n, index in enumerate(np.flatnonzero(labels[5000:] == label)[:count]):
        (folder / f"{n}.png").write_bytes(tf.io.encode_png(images[5000 + index]).numpy())
    return str(folder)


@pytest.mark.slow  # Trains 3 epochs on 4,200 images (about 25 s).
def test_a_held_out_class_is_mostly_rejected_as_unknown_and_predict_agrees(tiny, tmp_path):
    from transfer_engine.engine.maths import calibration
    from transfer_engine.engine.jobs import predict, training

    unknown = _class_folder(tmp_path / "t_shirts", 0, 200)  # Trained on seven classes, not T-shirt/top.
    config = tiny(label_subset=(1, 2, 3, 5, 7, 8, 9), train_split="train[:10%]", eval_split="test[:2000]",
                  test_split="test[2000:4000]", epochs=3, batch_size=32, bn_momentum=0.9, target_accuracy=0.97,
                  unknown_dir=unknown, model_dir=str(tmp_path / "run"))
    results = training.train(config)
    report = results["calibration"]
    eval_kept, test_kept = report["at_threshold"]["eval"], report["at_threshold"]["test"]
    print(f"\ntest accuracy {results['test_accuracy']:.4f}, temperature {report['temperature']:.3f}, threshold "
          f"{report['threshold']:.4f}: eval {eval_kept}, test {test_kept}, unknown {report['unknown']}")
    assert report["fitted_on_eval_examples"] == round(eval_kept["accepted"] / eval_kept["coverage"]) > 1000
    assert eval_kept["accuracy"] >= 0.97  # What --target_accuracy asked of the eval split...
    assert test_kept["accuracy"] > results["test_accuracy"]  # ...buys accuracy on the unseen test split too,
    assert test_kept["coverage"] >= 0.8  # at a small cost in known images,
    assert report["unknown"]["images"] == 200 and report["unknown"]["rejected"] > 0.5  # and most unknowns go.
    assert report["test"]["ece_after"] < report["test"]["ece_before"] or report["test"]["ece_before"] < 0.02
    assert os.path.getsize(os.path.join(config.model_dir, "coverage.png")) > 10_000
    with open(os.path.join(config.model_dir, "results.json")) as f:
        assert json.load(f)["calibration"]["threshold"] == report["threshold"]

    # predict, from model.keras and results.json, answers unknown for the same share of the same images.
    asked = replace(config, job="predict", inputs=(unknown,), min_confidence=report["threshold"], top_k=7,
                    output=str(tmp_path / "unknown.csv"))
    summary = predict.predict(asked)
    answers = [row["answer"] for row in summary["predictions"]]
    assert answers.count("unknown") / len(answers) == pytest.approx(report["unknown"]["rejected"], abs=0.011)
    with open(asked.output) as f:
        rows = list(csv.DictReader(f))
    assert [row["label"] for row in rows] == answers
    assert [row["top_class"] for row in rows] == [row["classes"][0] for row in summary["predictions"]]
    # Its probabilities are the temperature's: every row sums to 1 over all classes, and the top class's
    # probability is below the threshold exactly when the answer is unknown.
    for row, answer in zip(rows, answers):
        top = float(row["probability"])
        assert (top < report["threshold"]) == (answer == "unknown")
        assert sum(float(row[key]) for key in row if key.startswith("probability")) == pytest.approx(1, abs=1e-5)

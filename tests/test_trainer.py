"""engine/trainer.py: the loss, replica-count invariance, steps_per_loop, mixed precision."""

import json
import os

import keras
import numpy as np
import pytest

from engine import jobs
from engine.trainer import learning_rate_schedule, per_example_loss
from helpers import replace, train_run
from models.classifier import BACKBONE_LAYER


def read_metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_weights(model_dir):
    model = keras.saving.load_model(os.path.join(model_dir, "model.keras"))
    return [w.numpy() for w in model.weights]


def test_loss_is_softmax_cross_entropy_or_sigmoid_for_one_logit():
    labels = np.array([0, 2, 1])
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [1.0, 3.0, 0.0]], "float32")
    loss, correct = per_example_loss(labels, logits)
    expected = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_array_equal(correct, [1, 1, 1])

    binary_labels = np.array([0, 1, 1])
    binary_logits = np.array([[0.3], [-2.0], [4.0]], "float32")
    loss, correct = per_example_loss(binary_labels, binary_logits)
    expected = keras.losses.binary_crossentropy(binary_labels[:, None].astype("float32"), binary_logits, from_logits=True)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_array_equal(correct, [0, 0, 1])


def test_one_and_two_replicas_train_the_same_weights(tiny, pretrained_run, tmp_path):
    # BatchNorm in inference (finetune keeps it frozen) and no dropout: each example's gradient is then
    # independent of how the global batch is split, so 1 and 2 replicas must agree.
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=4, weights=weights, batch_size=8, steps_per_epoch=6, epochs=2)
    runs = {}
    for replicas in (1, 2):
        model_dir = tmp_path / f"replicas{replicas}"
        runs[replicas] = train_run(replace(config, cpu_replicas=replicas), model_dir)
        runs[replicas]["metrics"] = read_metrics(model_dir)
        runs[replicas]["weights"] = final_weights(model_dir)
    for one, two in zip(runs[1]["metrics"], runs[2]["metrics"]):
        np.testing.assert_allclose(one["train_loss"], two["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(one["eval_loss"], two["eval_loss"], rtol=1e-5)
    for one, two in zip(runs[1]["weights"], runs[2]["weights"]):
        np.testing.assert_allclose(one, two, rtol=1e-4, atol=1e-6)
    assert runs[1]["global_step"] == runs[2]["global_step"] == 12
    assert runs[2]["devices"]["replicas"] == 2


def test_steps_per_loop_gives_the_same_weights_as_single_steps(tiny, tmp_path):
    config = tiny(mode="scratch", steps_per_epoch=6, dropout=0.3)
    one = train_run(replace(config, steps_per_loop=1), tmp_path / "one")
    four = train_run(replace(config, steps_per_loop=4), tmp_path / "four")
    assert one["global_step"] == four["global_step"] == 6
    np.testing.assert_allclose(one["train_loss"], four["train_loss"], rtol=1e-6)
    for a, b in zip(final_weights(tmp_path / "one"), final_weights(tmp_path / "four")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mixed_float16_scales_the_loss_and_keeps_frozen_weights(tiny, pretrained_run, tmp_path):
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=2, weights=weights, precision="mixed_float16", steps_per_epoch=4)
    setup = jobs.build(replace(config, model_dir=str(tmp_path)))
    assert isinstance(setup.optimizer, keras.optimizers.LossScaleOptimizer)
    assert setup.model.get_layer(BACKBONE_LAYER).compute_dtype == "float16"

    results = train_run(config, tmp_path / "run")
    assert results["devices"]["precision"] == "mixed_float16"
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["test_loss"])
    assert results["trainability_audit"]["frozen_changed"] == 0
    assert results["trainability_audit"]["trainable_changed"] == results["trainability_audit"]["trainable_variables"]


def test_learning_rate_schedules():
    cosine = learning_rate_schedule(learning_rate=0.1, schedule="cosine", warmup_steps=0, total_steps=100)
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(50)) == pytest.approx(0.05)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-7)
    warm = learning_rate_schedule(learning_rate=0.1, schedule="constant", warmup_steps=10, total_steps=100)
    assert [round(float(warm(step)), 6) for step in (0, 5, 10, 60, 100)] == [0.0, 0.05, 0.1, 0.1, 0.1]
    assert learning_rate_schedule(learning_rate=0.1, schedule="constant", warmup_steps=0, total_steps=9) == 0.1

"""engine/feature_cache.py: training the head on cached features is training through the live frozen
backbone, done once per example."""


import keras
import numpy as np
import pytest

from engine import assembly, feature_cache
from helpers import replace, train_run


def _logits_weights(model_dir):
    model = keras.saving.load_model(str(model_dir / "model.keras"))
    return [weight.numpy() for weight in model.get_layer("logits").weights]


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_head_training_on_cached_features_matches_the_live_frozen_backbone(tiny, pretrained_run, tmp_path, replicas):
    config = tiny(mode="frozen", weights=pretrained_run, dropout=0.3, epochs=2, train_split="train[:2%]",
                  cpu_replicas=replicas, strategy="mirrored" if replicas > 1 else "auto")
    live = train_run(replace(config, feature_cache="off"), tmp_path / "live")
    cached = train_run(replace(config, feature_cache="auto"), tmp_path / "cached")

    assert live["feature_cache"] is None
    assert cached["feature_cache"]["examples"]["test"] == live["test_examples"]
    for key in ("train_loss", "eval_loss", "test_loss"):
        assert cached[key] == pytest.approx(live[key], rel=1e-4), key
    for key in ("train_accuracy", "eval_accuracy", "test_accuracy"):
        assert cached[key] == pytest.approx(live[key], abs=1e-6), key
    for live_weight, cached_weight in zip(_logits_weights(tmp_path / "live"), _logits_weights(tmp_path / "cached")):
        np.testing.assert_allclose(cached_weight, live_weight, rtol=1e-4, atol=1e-6)
    assert cached["trainability_audit"]["frozen_changed"] == 0


@pytest.mark.slow
def test_extraction_keeps_every_example_once_in_order_with_two_replicas(tiny, pretrained_run):
    """Padding is dropped and replica outputs are put back in the examples' order."""
    features = {}
    for replicas in (1, 2):
        config = tiny(mode="frozen", weights=pretrained_run, eval_split="test[:151]", batch_size=8,
                      cpu_replicas=replicas, strategy="mirrored" if replicas > 1 else "auto")
        run = assembly.build(config)
        extracted = feature_cache.extract(run, run.splits["eval"])
        features[replicas] = list(extracted.dataset.as_numpy_iterator())
        labels = [label for _, label in run.splits["eval"].dataset.as_numpy_iterator()]
        assert [label for _, label in features[replicas]] == labels
        assert extracted.count == len(labels)
    for (one, _), (two, _) in zip(features[1], features[2]):
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_augmentation_turns_the_cache_off_and_says_why(tiny, pretrained_run, tmp_path):
    config = tiny(mode="frozen", weights=pretrained_run, augment="flip")
    assert "changes the pixels every epoch" in feature_cache.reason_not_to_cache(config)
    assert feature_cache.reason_not_to_cache(replace(config, augment="none")) is None
    assert "trains the backbone" in feature_cache.reason_not_to_cache(replace(config, mode="scratch"))
    assert train_run(config, tmp_path)["feature_cache"] is None

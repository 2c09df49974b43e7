"""engine/core/feature_cache.py: training on the cached output of the frozen lower part is training through
the live model, done once per example; the cut is below every layer that trains and never inside a
residual block."""

import os

import keras
import numpy as np
import pytest

from transfer_engine.engine.core import assembly, feature_cache
from helpers import load_weights_file, replace, train_run
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier


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
        extracted = feature_cache.extract(run, feature_cache.find_cut(run.model).lower, run.splits["eval"])
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
    assert feature_cache.reason_not_to_cache(replace(config, augment="none", mode="finetune", unfreeze=2)) is None
    assert "mix the images of every batch" in feature_cache.reason_not_to_cache(replace(config, augment="none", mixup=0.2))
    assert "trains the backbone's first layers" in feature_cache.reason_not_to_cache(replace(config, mode="scratch"))
    assert "trains the backbone's first layers" in feature_cache.reason_not_to_cache(replace(config, mode="lora"))
    assert train_run(config, tmp_path)["feature_cache"] is None


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_a_finetune_run_that_trains_the_first_layer_trains_live_and_says_why(tiny, pretrained_run, tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")
    config = tiny(mode="finetune", unfreeze=6, weights=pretrained_run, steps_per_epoch=2)
    assert feature_cache.reason_not_to_cache(config) is None  # Only the model can tell: no cut exists.
    results = train_run(config, tmp_path)
    assert results["feature_cache"] is None
    assert "Feature cache off: the lowest layer that trains is the backbone's first" in caplog.text
    assert results["global_step"] == 2 and results["trainability_audit"]["frozen_changed"] == 0


def residual_backbone(trains=(), dropout_after=None):
    """input -> c1 -> c2 -> c3 -> add(c1, c3) -> c4 -> c5: a residual block whose skip starts at c1.
    `trains` names the convolutions that train; `dropout_after` puts a Dropout after that layer."""
    inputs = keras.Input((8, 8, 3))
    layers = {name: keras.layers.Conv2D(3, 1, padding="same", name=name) for name in ("c1", "c2", "c3", "c4", "c5")}
    x1 = layers["c1"](inputs)
    x = layers["c3"](layers["c2"](x1))
    x = keras.layers.Add(name="add")([x1, x])
    if dropout_after == "add":
        x = keras.layers.Dropout(0.5, name="drop")(x)
    x = layers["c5"](layers["c4"](x))
    model = keras.Model(inputs, x)
    for name, layer in layers.items():
        layer.trainable = name in trains
    return model


@pytest.mark.parametrize("trains, dropout_after, expected", [
    ((), None, "c5"),  # Nothing trains: the whole backbone is below the cut.
    (("c5",), None, "c4"),
    (("c4",), None, "add"),  # After the block, where its two branches have met.
    (("c3",), None, "c1"),  # Never inside the block: c2's output is not all that c3's consumers need.
    (("c2", "c5"), None, "c1"),  # Below the lowest layer that trains.
    (("c5",), "add", "add"),  # Dropout computes differently in training: it runs above the cut.
    (("c1",), None, None),  # Nothing with weights below the first layer that trains.
])
def test_the_cut_is_below_what_trains_and_never_inside_a_residual_block(trains, dropout_after, expected):
    found = feature_cache.backbone_cut(residual_backbone(trains, dropout_after))
    assert (found[1] if found else None) == expected


def test_the_two_parts_of_a_finetuned_mobilenet_v2_compute_the_whole_and_share_its_variables():
    model = build_classifier(backbone="mobilenet_v2", image_size=32, channels=1, num_classes=3, alpha=0.35,
                             dropout=0.2)
    trained = trainability.apply(model, mode="finetune", rule=trainability.Rule(unfreeze=30))
    cut = feature_cache.find_cut(model)
    assert cut.layer == "block_11_add", cut.layer  # The unfrozen top 30 start inside block 12.
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype="uint8")
    np.testing.assert_allclose(cut.upper(cut.lower(images)), model(images, training=False), rtol=1e-5, atol=1e-6)
    weights = {id(weight) for weight in model.weights}
    assert all(id(weight) in weights for weight in cut.upper.weights + cut.lower.weights), "copied, not shared"
    upper = {id(weight) for weight in cut.upper.weights}
    assert all(id(weight) in upper for weight in trained), "a trained variable is below the cut"
    trainability.apply(model, mode="frozen")
    assert feature_cache.find_cut(model).layer == "pool"  # Frozen: the head reads the pooled features.


@pytest.mark.slow
@pytest.mark.parametrize("replicas, bn", [(1, "frozen"), (2, "frozen"), (1, "train")])
def test_finetuning_on_cached_activations_matches_the_live_model(tiny, pretrained_run, tmp_path, replicas, bn):
    start = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=2, bn=bn, weights=start, dropout=0.3, epochs=2, train_split="train[:2%]",
                  cpu_replicas=replicas, strategy="mirrored" if replicas > 1 else "auto")
    live = train_run(replace(config, feature_cache="off"), tmp_path / "live")
    cached = train_run(config, tmp_path / "cached")

    assert live["feature_cache"] is None
    assert cached["feature_cache"]["cut"] == "block2_pool"
    assert cached["feature_cache"]["examples"]["test"] == live["test_examples"]
    for key in ("train_loss", "eval_loss", "test_loss"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5), key
    for key in ("train_accuracy", "eval_accuracy", "test_accuracy"):
        assert cached[key] == pytest.approx(live[key], abs=1e-6), key
    live_model = keras.saving.load_model(str(tmp_path / "live" / "model.keras"))
    cached_model = keras.saving.load_model(str(tmp_path / "cached" / "model.keras"))
    for a, b in zip(live_model.weights, cached_model.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)
    # Below the cut, bitwise what the run started from; above it, what the rule trains moved.
    before, after = load_weights_file(start), load_weights_file(str(tmp_path / "cached" / "backbone.weights.h5"))
    for path in before:
        if path.startswith(("block1", "block2")):
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    assert not np.array_equal(after["block3_conv/kernel"], before["block3_conv/kernel"])
    assert cached["trainability_audit"]["frozen_changed"] == 0


@pytest.mark.slow
def test_a_staged_run_uses_the_cache_for_both_stages(tiny, pretrained_run, tmp_path):
    config = tiny(mode="finetune", unfreeze=2, head_epochs=1, epochs=2, weights=pretrained_run,
                  train_split="train[:2%]")
    live = train_run(replace(config, feature_cache="off"), tmp_path / "live")
    cached = train_run(config, tmp_path / "cached")
    assert cached["feature_cache"]["cut"] == "block2_pool"
    for key in ("train_loss", "eval_loss", "test_loss"):
        assert cached[key] == pytest.approx(live[key], rel=1e-5), key


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_a_cache_over_its_budget_goes_to_disk_or_is_skipped_with_a_reason(tiny, pretrained_run, tmp_path, caplog):
    caplog.set_level("INFO", logger="absl")
    config = tiny(mode="finetune", unfreeze=2, weights=pretrained_run, train_split="train[:1%]",
                  feature_cache_max_gb=1e-6, model_dir=str(tmp_path / "run"))
    run = assembly.build(config)
    assert feature_cache.build(run) is None
    assert "would take 2.1 MB, over --feature_cache_max_gb (1.0 KB); set --cache to a directory" in caplog.text

    in_memory = feature_cache.build(assembly.build(replace(config, feature_cache_max_gb=None)))
    on_disk = feature_cache.build(assembly.build(replace(config, cache=str(tmp_path / "cache"))))
    assert on_disk.report["where"] == str(tmp_path / "cache" / "features")
    assert in_memory.report["where"] == "memory" and in_memory.report["bytes"] == on_disk.report["bytes"]
    for name in ("train", "eval", "test"):
        memory = list(in_memory.splits[name].dataset.as_numpy_iterator())
        disk = list(on_disk.splits[name].dataset.as_numpy_iterator())
        assert len(disk) == len(memory) == in_memory.splits[name].count
        for (a, label_a), (b, label_b) in zip(memory, disk):
            np.testing.assert_array_equal(a, b)
            assert label_a == label_b
    written = _files(tmp_path / "cache" / "features")
    assert len(written) == 3 * 3  # Features, labels and count of each split.
    again = feature_cache.build(assembly.build(replace(config, cache=str(tmp_path / "cache"))))
    assert _files(tmp_path / "cache" / "features") == written, "complete cache files were written again"
    assert again.splits["train"].count == on_disk.splits["train"].count


def _files(folder):
    """{path: modification time} of every file under `folder`."""
    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _, names in os.walk(folder) for name in names}


def test_the_on_disk_cache_of_a_folder_split_changes_with_its_selection_rule_and_contents():
    """Activations cached under one way of selecting a split's examples, or of another state of the folder,
    are never read as another's."""
    from types import SimpleNamespace

    inputs = keras.Input((4,))
    lower = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    run = SimpleNamespace(config=SimpleNamespace(image_size=32, max_image_pixels=89_478_485), worker=(0, 1))

    def examples(scheme, contents="3f2a"):
        source = SimpleNamespace(name="folder:x", label_subset=(), split_scheme=scheme, contents=contents)
        return SimpleNamespace(split=SimpleNamespace(source=source, name="train[:80%]"))

    assert feature_cache.folder_name(run, lower, examples("stratified")) == feature_cache.folder_name(
        run, lower, examples("stratified"))
    assert feature_cache.folder_name(run, lower, examples("stratified")) != feature_cache.folder_name(
        run, lower, examples(""))
    assert feature_cache.folder_name(run, lower, examples("stratified", "77c0")) != feature_cache.folder_name(
        run, lower, examples("stratified"))  # Images added, removed or rewritten.
    limited = SimpleNamespace(config=SimpleNamespace(image_size=32, max_image_pixels=10_000), worker=(0, 1))
    assert feature_cache.folder_name(limited, lower, examples("")) != feature_cache.folder_name(
        run, lower, examples(""))  # --max_image_pixels decides which images are there.

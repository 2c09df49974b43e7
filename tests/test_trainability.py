"""models/trainability.py: which layers receive gradients, checked after real training.

The checks compare the backbone weights file a run starts from with the one it ends with, bitwise,
independently of the engine's own audit (which must agree).
"""

import os

import keras
import numpy as np
import pytest

from engine.config import ConfigError
from helpers import load_weights_file, train_run
from models import trainability
from models.classifier import BACKBONE_LAYER, build_classifier


def small_model():
    return build_classifier(backbone="small_cnn", image_size=32, channels=1, num_classes=3)


def trainable_layer_names(model):
    backbone = model.get_layer(BACKBONE_LAYER)
    return [layer.name for layer in backbone.layers if layer.trainable_weights]


def test_scratch_trains_everything():
    model = small_model()
    trainability.apply_mode(model, mode="scratch")
    assert len(trainable_layer_names(model)) == 6
    assert trainability.frozen_weights(model) == []


def test_frozen_trains_only_the_head():
    model = small_model()
    trainability.apply_mode(model, mode="frozen")
    assert trainable_layer_names(model) == []
    assert [w.path for w in model.trainable_weights] == ["logits/kernel", "logits/bias"]
    trainable, frozen = trainability.parameter_counts(model)
    assert trainable == 64 * 3 + 3
    assert frozen == sum(int(np.prod(w.shape)) for w in model.get_layer(BACKBONE_LAYER).weights)


@pytest.mark.parametrize("unfreeze, expected", [(1, []), (2, ["block3_conv"]), (4, ["block2_conv", "block3_conv"])])
def test_finetune_unfreezes_the_top_weighted_layers_with_batchnorm_kept_frozen(unfreeze, expected):
    model = small_model()
    trainability.apply_mode(model, mode="finetune", unfreeze=unfreeze)
    # Weighted layers bottom to top: conv1, bn1, conv2, bn2, conv3, bn3; BatchNorm stays in inference.
    assert trainable_layer_names(model) == expected


def test_unfreezing_more_layers_than_the_backbone_has_is_refused():
    with pytest.raises(ConfigError, match=r"^--unfreeze=7: the backbone has only 6 layers with weights$"):
        trainability.apply_mode(small_model(), mode="finetune", unfreeze=7)


def test_parameter_table_adds_up():
    model = small_model()
    trainability.apply_mode(model, mode="finetune", unfreeze=2)
    rows = {name.strip(): (trainable, frozen) for name, trainable, frozen in trainability.parameter_table(model)}
    assert rows["total"] == trainability.parameter_counts(model)
    assert rows["backbone"][0] + rows["head"][0] == rows["total"][0]
    assert "trains from block3_conv" in rows
    assert "trains from block3_conv" in trainability.format_table(trainability.parameter_table(model))


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("mode", ["scratch", "frozen", "finetune"])
def test_training_moves_exactly_what_the_mode_says(tiny, pretrained_run, tmp_path, mode, replicas):
    start = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode=mode, unfreeze=2, weights=start, cpu_replicas=replicas, steps_per_epoch=4, dropout=0.2)
    results = train_run(config, tmp_path)
    before = load_weights_file(start)
    after = load_weights_file(str(tmp_path / "backbone.weights.h5"))
    changed = sorted(path for path in before if not np.array_equal(before[path], after[path]))

    if mode == "frozen":
        assert changed == [], f"frozen backbone weights moved: {changed}"
    elif mode == "finetune":
        assert changed == ["block3_conv/kernel"], f"finetune --unfreeze=2 changed {changed}"
    else:  # scratch ignores the file and starts from the seeded random init: all of it must move.
        keras.utils.set_random_seed(config.seed)
        initial = {w.path: w.numpy() for w in small_model().get_layer(BACKBONE_LAYER).weights}
        unchanged = [path for path in after if np.array_equal(initial[path], after[path])]
        assert unchanged == [], f"scratch left these backbone weights untouched: {unchanged}"
    audit = results["trainability_audit"]
    assert audit["frozen_changed"] == 0, audit["frozen_changed_paths"]
    assert audit["trainable_changed"] == audit["trainable_variables"] > 0
    expected_frozen = {"scratch": 0, "frozen": 15, "finetune": 14}[mode]
    assert audit["frozen_variables"] == expected_frozen
    assert results["trainable_params"] + results["non_trainable_params"] == sum(
        int(np.prod(value.shape)) for value in after.values()
    ) + 64 * 3 + 3

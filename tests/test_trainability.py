"""models/trainability.py: which variables train, checked after real training.

Run-level checks compare the backbone weights file a run starts from with the one it ends with,
bitwise, independently of the engine's own audit (which must agree).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.engine.core import assembly
from transfer_engine.errors import ConfigError
from transfer_engine.engine.core.optimizer import make_optimizer
from transfer_engine.engine.core.steps import Stages
from helpers import load_weights_file, train_run
from transfer_engine.models import trainability
from transfer_engine.models.classifier import BACKBONE_LAYER, build_classifier
from transfer_engine.models.trainability import Rule

MOVING = ("moving_mean", "moving_variance")


def small_model():
    return build_classifier(backbone="small_cnn", image_size=32, channels=1, num_classes=3)


def trained_paths(variables):
    return [variable.path for variable in variables]


def test_scratch_trains_everything():
    model = small_model()
    variables = trainability.apply(model, mode="scratch")
    assert len(variables) == 2 + 3 * 3  # logits kernel+bias; per block conv kernel, bn gamma+beta
    assert trainability.frozen_weights(model, variables) == []


def test_frozen_trains_only_the_head():
    model = small_model()
    variables = trainability.apply(model, mode="frozen")
    assert trained_paths(variables) == ["logits/kernel", "logits/bias"]
    trainable, frozen = trainability.parameter_counts(model, variables)
    assert trainable == 64 * 3 + 3
    assert frozen == sum(int(np.prod(w.shape)) for w in model.get_layer(BACKBONE_LAYER).weights)
    assert not any(layer.trainable for layer in model.get_layer(BACKBONE_LAYER).layers)


@pytest.mark.parametrize(
    "rule, bn, expected",
    [
        (Rule(unfreeze=1), "frozen", []),
        (Rule(unfreeze=2), "frozen", ["block3_conv/kernel"]),
        (Rule(unfreeze=2), "train", ["block3_conv/kernel", "block3_bn/gamma", "block3_bn/beta"]),
        (Rule(unfreeze_from="block2_relu"), "frozen", ["block3_conv/kernel"]),
        (Rule(unfreeze_from="block2_bn"), "train",
         ["block2_bn/gamma", "block2_bn/beta", "block3_conv/kernel", "block3_bn/gamma", "block3_bn/beta"]),
        (Rule(regex=r"block[13]_conv"), "frozen", ["block1_conv/kernel", "block3_conv/kernel"]),
        (Rule(regex=r"gamma$"), "train", ["block1_bn/gamma", "block2_bn/gamma", "block3_bn/gamma"]),
        (Rule(regex=r"gamma$"), "frozen", []),
    ],
)
def test_finetune_rules_select_exactly_these_backbone_variables(rule, bn, expected):
    model = small_model()
    variables = trainability.apply(model, mode="finetune", rule=rule, bn=bn)
    assert trained_paths(variables) == ["logits/kernel", "logits/bias", *expected]
    for layer in model.get_layer(BACKBONE_LAYER).layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            trains = any(path.startswith(layer.name + "/") for path in expected)
            assert layer.trainable == trains, f"{layer.name} would run in the wrong BatchNorm mode"


@pytest.mark.parametrize(
    "rule, message",
    [
        (Rule(unfreeze=7), r"^--unfreeze=7: the backbone has only 6 layers with weights$"),
        (Rule(unfreeze_from="block9_conv"), r"^--unfreeze_from=block9_conv: no such backbone layer \(names look"),
        (Rule(regex="nothing_like_this"), r"^--trainable_regex=nothing_like_this: matches no backbone variable"),
    ],
)
def test_rules_that_select_nothing_real_are_refused(rule, message):
    with pytest.raises(ConfigError, match=message):
        trainability.apply(small_model(), mode="finetune", rule=rule)


def test_parameter_table_groups_blocks_and_adds_up():
    model = build_classifier(backbone="mobilenet_v2", image_size=32, channels=3, num_classes=2, alpha=0.35)
    variables = trainability.apply(model, mode="finetune", rule=Rule(unfreeze_from="block_16_expand"))
    rows = trainability.parameter_table(model, variables)
    names = [row[0] for row in rows]
    assert names[:3] == ["stem", "expanded_conv", "block_1"] and names[-4:] == ["block_16", "top", "head", "total"]
    by_name = {row[0]: row for row in rows}
    assert by_name["block_15"][2] == 0 and by_name["block_16"][2] > 0 and by_name["top"][2] > 0
    assert by_name["total"][2:] == trainability.parameter_counts(model, variables)
    assert sum(row[2] for row in rows[:-1]) == by_name["total"][2]
    assert "block_16" in trainability.format_table(rows)


def test_slow_batchnorm_momentum_is_spotted():
    model = build_classifier(backbone="mobilenet_v2", image_size=32, channels=3, num_classes=2, alpha=0.35)
    trainability.apply(model, mode="scratch")
    assert trainability.slow_batchnorm_momentum(model, total_steps=1000) == pytest.approx(0.999)
    trainability.apply(model, mode="scratch", bn_momentum=0.99)
    assert trainability.slow_batchnorm_momentum(model, total_steps=1000) is None
    assert trainability.slow_batchnorm_momentum(model, total_steps=499) == pytest.approx(0.99)


@pytest.mark.parametrize("steps, momentum", [(500, 0.99), (499, 0.98), (1000, 0.99), (50, 0.9), (44, 0.88), (5, 0.0)])
def test_the_suggested_momentum_settles_within_the_run_and_is_the_largest_that_does(steps, momentum):
    suggested = trainability.settling_momentum(steps)
    assert suggested == momentum
    assert suggested == 0 or steps >= trainability.SETTLING_HORIZONS / (1 - suggested) - 1e-9
    assert suggested == 0.99 or steps < trainability.SETTLING_HORIZONS / (1 - (suggested + 0.01))  # In hundredths.


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("mode", ["scratch", "frozen", "finetune"])
def test_training_moves_exactly_what_the_mode_says(tiny, pretrained_run, tmp_path, mode, replicas):
    start = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(
        mode=mode, unfreeze=2 if mode == "finetune" else 0, weights=start, cpu_replicas=replicas,
        steps_per_epoch=4, dropout=0.2, optimizer="adamw", weight_decay=0.1,
    )
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


def _optimizer_values(optimizer):
    return {variable.path: np.array(variable.numpy(), copy=True) for variable in optimizer.variables}


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_staged_finetuning_switches_once_and_keeps_the_head_optimizer_state(tiny, pretrained_run, tmp_path):
    weights = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=2, head_epochs=1, epochs=2, weights=weights, steps_per_epoch=3,
                  model_dir=str(tmp_path))
    run = assembly.build(config)
    stages = Stages(run)
    built = list(run.optimizer.variables)
    iterator = iter(run.train_dataset())
    head_stage = stages(0)
    assert trained_paths(head_stage.variables) == ["logits/kernel", "logits/bias"]
    for _ in range(3):
        head_stage.train_steps(iterator, tf.constant(1))
    assert stages(0) is head_stage
    assert head_stage.train_steps.experimental_get_tracing_count() == 1
    at_switch = _optimizer_values(run.optimizer)

    full_stage = stages(1)
    assert full_stage is not head_stage
    assert trained_paths(full_stage.variables) == ["logits/kernel", "logits/bias", "block3_conv/kernel"]
    assert list(run.optimizer.variables) == built, "the optimizer was rebuilt at the switch"
    for path, value in _optimizer_values(run.optimizer).items():
        np.testing.assert_array_equal(value, at_switch[path], err_msg=f"{path} changed at the switch")
    head_slots = [p for p in at_switch if "logits_kernel" in p or "logits/kernel" in p]
    assert head_slots and any(np.any(at_switch[p] != 0) for p in head_slots if "iteration" not in p)
    for _ in range(2):
        full_stage.train_steps(iterator, tf.constant(1))
    assert full_stage.train_steps.experimental_get_tracing_count() == 1
    after = _optimizer_values(run.optimizer)
    assert int(run.optimizer.iterations.numpy()) == 5
    conv_slots = [p for p in after if "block3_conv_kernel" in p]
    assert conv_slots and all(np.any(after[p] != 0) for p in conv_slots), "backbone slots never used"


@pytest.mark.slow
def test_a_staged_run_leaves_the_backbone_alone_until_the_switch(tiny, pretrained_run, tmp_path):
    start = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="finetune", unfreeze=2, head_epochs=1, epochs=2, weights=start, steps_per_epoch=3)
    results = train_run(config, tmp_path)
    assert results["trainability_audit"]["frozen_changed"] == 0
    model = build_classifier(backbone="small_cnn", image_size=32, channels=1, num_classes=3)
    checkpoints = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), str(tmp_path / "checkpoints"), 3)
    first_epoch = [path for path in checkpoints.checkpoints if path.endswith("-3")]
    tf.train.Checkpoint(model=model).restore(first_epoch[0]).expect_partial()
    before = load_weights_file(start)
    after_head_epoch = {w.path: w.numpy() for w in model.get_layer(BACKBONE_LAYER).weights}
    assert all(np.array_equal(before[p], after_head_epoch[p]) for p in before), "backbone moved in the head stage"
    final = load_weights_file(str(tmp_path / "backbone.weights.h5"))
    assert [p for p in before if not np.array_equal(before[p], final[p])] == ["block3_conv/kernel"]


def test_backbone_learning_rate_multiplier_scales_backbone_updates_only():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1), dtype="uint8")
    labels = np.array([0, 1, 2, 1])

    def one_step(multiplier):
        keras.utils.set_random_seed(5)
        model = small_model()
        variables = trainability.apply(model, mode="scratch")
        backbone = {id(w) for w in model.get_layer(BACKBONE_LAYER).weights}
        optimizer = make_optimizer(
            name="sgd", learning_rate=0.1, weight_decay=0.0, precision="float32", variables=variables,
            lr_multipliers={id(w): multiplier for w in variables if id(w) in backbone},
        )
        before = [w.numpy() for w in variables]
        with tf.GradientTape() as tape:
            logits = model(images, training=False)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
        optimizer.apply(tape.gradient(loss, variables), variables)
        return {w.path: w.numpy() - b for w, b in zip(variables, before)}

    full, tenth = one_step(1.0), one_step(0.1)
    np.testing.assert_allclose(tenth["logits/kernel"], full["logits/kernel"], rtol=1e-5)
    np.testing.assert_allclose(tenth["block1_conv/kernel"], 0.1 * full["block1_conv/kernel"], rtol=1e-3, atol=5e-8)
    assert np.abs(full["block1_conv/kernel"]).max() > 0


@pytest.mark.slow  # Builds two runs.
def test_a_run_gives_backbone_lr_mult_to_the_backbone_alone(tiny, tmp_path):
    """The wiring of --backbone_lr_mult (engine/core/assembly.py): the same step moves the head as much at 0.5 as
    at 1, and the backbone half as much."""
    moved = {}
    for multiplier in (1.0, 0.5):
        run = assembly.build(tiny(mode="scratch", optimizer="sgd", backbone_lr_mult=multiplier,
                                  model_dir=str(tmp_path / str(multiplier))))
        before = {w.path: w.numpy() for w in run.trained_variables}
        run.optimizer.apply([tf.ones_like(w) for w in run.trained_variables], run.trained_variables)
        moved[multiplier] = {w.path: w.numpy() - before[w.path] for w in run.trained_variables}
    np.testing.assert_allclose(moved[0.5]["logits/kernel"], moved[1.0]["logits/kernel"], rtol=1e-6)
    np.testing.assert_allclose(moved[0.5]["block1_conv/kernel"], 0.5 * moved[1.0]["block1_conv/kernel"], rtol=1e-3)
    assert np.abs(moved[1.0]["block1_conv/kernel"]).min() > 0


def test_weight_decay_skips_biases_and_batchnorm():
    model = small_model()
    variables = trainability.apply(model, mode="scratch")
    optimizer = make_optimizer(name="adamw", learning_rate=0.1, weight_decay=0.5, precision="float32",
                               variables=variables)
    before = {w.path: w.numpy() for w in variables}
    optimizer.apply([tf.zeros_like(w) for w in variables], variables)  # Only decay can move anything.
    moved = sorted(w.path for w in variables if not np.array_equal(before[w.path], w.numpy()))
    assert moved == ["block1_conv/kernel", "block2_conv/kernel", "block3_conv/kernel", "logits/kernel"]


@pytest.mark.slow
@pytest.mark.parametrize("replicas", [1, 2])
def test_lora_trains_low_rank_factors_only_and_model_keras_predicts_as_the_trained_model(
        tiny, pretrained_run, tmp_path, replicas):
    from transfer_engine.data import pipeline
    from helpers import replace

    start = os.path.join(pretrained_run, "backbone.weights.h5")
    config = tiny(mode="lora", lora_rank=2, weights=start, cpu_replicas=replicas, steps_per_epoch=4,
                  learning_rate=0.01)
    results = train_run(config, tmp_path)
    audit = results["trainability_audit"]
    assert audit["frozen_changed"] == 0, audit["frozen_changed_paths"]
    assert audit["trainable_changed"] == audit["trainable_variables"] > 0
    run = assembly.build(replace(config, model_dir=str(tmp_path)), pretrained=False)
    run.checkpoints.restore()
    backbone = run.model.get_layer(BACKBONE_LAYER)
    layers = trainability.adaptable(backbone)
    assert layers and all(layer.lora_enabled for layer in layers)
    backbone_ids = {id(weight) for weight in backbone.weights}
    assert sorted(v.path for v in run.trained_variables if id(v) in backbone_ids) == sorted(
        f"{layer.name}/lora_kernel_{ab}" for layer in layers for ab in "ab")
    # Fewer parameters than fine-tuning the whole backbone; the base kernels and biases as pretrained, bitwise.
    everything = sum(int(np.prod(w.shape)) for w in run.model.weights if not w.path.endswith(MOVING + ("_a", "_b")))
    assert results["trainable_params"] < everything
    pretrained = load_weights_file(start)
    for layer in layers:
        np.testing.assert_array_equal(layer._kernel.numpy(), pretrained[f"{layer.name}/kernel"])
        if layer.use_bias:
            np.testing.assert_array_equal(layer.bias.numpy(), pretrained[f"{layer.name}/bias"])
    # model.keras loads in plain Keras with the factors merged, and predicts as the trained model does.
    saved = keras.saving.load_model(str(tmp_path / "model.keras"))
    images = next(iter(pipeline.decoded(run.splits["test"].split, image_size=32).batch(50)))[0]
    np.testing.assert_allclose(saved.predict(images, verbose=0), run.model(images, training=False), rtol=1e-5, atol=1e-6)
    # backbone.weights.h5 holds the merged kernels and loads into a backbone without factors.
    merged = load_weights_file(str(tmp_path / "backbone.weights.h5"))
    for layer in layers:
        np.testing.assert_allclose(merged[f"{layer.name}/kernel"], layer.kernel.numpy(), rtol=1e-6)
    assert any(not np.array_equal(merged[f"{layer.name}/kernel"], pretrained[f"{layer.name}/kernel"]) for layer in layers)


def test_the_audit_names_a_frozen_weight_that_moved_and_counts_trained_ones():
    """The audit is shown what it exists to catch: every run's test asserts it reports 0."""
    model = small_model()
    variables = trainability.apply(model, mode="frozen")
    before = trainability.snapshot(model)
    frozen = trainability.frozen_weights(model, variables)
    moved = frozen[0].numpy()
    largest = np.unravel_index(np.argmax(np.abs(moved)), moved.shape)
    moved[largest] = np.nextafter(moved[largest], np.float32(np.inf))  # One ulp of one element: close, not equal.
    frozen[0].assign(moved)
    variables[0].assign(variables[0].numpy() + 1)
    audit = trainability.audit(model, before, variables)
    assert (audit["frozen_changed"], audit["frozen_changed_paths"]) == (1, [frozen[0].path])
    assert audit["trainable_changed"] == 1 and audit["frozen_variables"] == len(frozen)


def test_lora_starts_from_the_pretrained_function():
    """Its B factors start at zero, so the adapted model computes what the pretrained one did."""
    model = small_model()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 1)).astype("uint8")
    for weight in model.weights:  # Non-zero weights everywhere, as pretrained ones are.
        weight.assign(np.random.default_rng(1).uniform(0.05, 0.15, weight.shape).astype(weight.dtype))
    plain = model(images, training=False).numpy()
    assert np.all(np.isfinite(plain)) and np.ptp(plain) > 0
    trainability.apply(model, mode="lora", lora_rank=2)
    np.testing.assert_array_equal(model(images, training=False).numpy(), plain)

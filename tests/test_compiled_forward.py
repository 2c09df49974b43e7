"""engine/core/compiled_forward.py: fused BatchNorm and frozen weights as constants compute what Keras' own
call computes, update what it updates, and leave nothing behind outside the engine's traced steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.engine.core.compiled_forward import CompiledForward
from transfer_engine.engine.core.optimizer import make_optimizer
from transfer_engine.engine.core.steps import Trainer
from transfer_engine.internals import fused_batch_norm
from helpers import one_device, two_devices
from transfer_engine.models import trainability
from transfer_engine.models.classifier import build_classifier

BN = keras.layers.BatchNormalization


def conv_bn_model(momentum=0.9, epsilon=1e-3, dropout=0.0):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = BN(momentum=momentum, epsilon=epsilon, name="bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(2, name="dense")(x)
    return keras.Model(inputs, outputs)


def images(seed=0, batch=5):
    return tf.random.stateless_normal([batch, 6, 6, 3], seed=[seed, 1]) * 20 + 5


def train_call(model, x, *, fused):
    """(outputs, gradients of a loss on them, the BN's moving statistics after) from one traced call."""

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            outputs = model(x, training=True)
            loss = tf.reduce_sum(outputs * tf.constant([1.0, -2.0]))
        return outputs, tape.gradient(loss, [x, *model.trainable_weights])

    bn = model.get_layer("bn")
    start = [w.numpy() for w in bn.non_trainable_weights]
    if fused:
        with fused_batch_norm(trainability.all_layers(model)):
            outputs, gradients = step(x)
    else:
        outputs, gradients = step(x)
    after = [w.numpy() for w in bn.non_trainable_weights]
    for weight, value in zip(bn.non_trainable_weights, start):
        weight.assign(value)
    return outputs.numpy(), [g.numpy() for g in gradients], after, step


def test_fused_batch_norm_matches_keras_in_training():
    model = conv_bn_model()
    x = images()
    plain = train_call(model, x, fused=False)
    fused = train_call(model, x, fused=True)
    np.testing.assert_allclose(fused[0], plain[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(fused[1], plain[1]):  # Input, conv kernel and bias, gamma, beta, dense.
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    for a, b in zip(fused[2], plain[2]):  # Moving mean and (biased) moving variance.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain[2][1], 1.0)  # The statistics really moved.
    graph_ops = {op.type for op in fused[3].get_concrete_function(x).graph.get_operations()}
    assert "FusedBatchNormV3" in graph_ops


def test_fused_batch_norm_leaves_inference_and_other_layers_to_keras():
    model = conv_bn_model(epsilon=1e-6)  # Below the fused kernel's minimum: Keras' own call.
    x = images()
    plain = train_call(model, x, fused=False)
    fused = train_call(model, x, fused=True)
    np.testing.assert_array_equal(fused[0], plain[0])
    assert "FusedBatchNormV3" not in {
        op.type for op in fused[3].get_concrete_function(x).graph.get_operations()
    }
    model = conv_bn_model()
    with fused_batch_norm(trainability.all_layers(model)):
        assert "call" in vars(model.get_layer("bn"))
        inference = model(x, training=False).numpy()
    np.testing.assert_array_equal(inference, model(x, training=False).numpy())
    assert "call" not in vars(model.get_layer("bn"))  # Nothing left behind after the trace.


def frozen_conv_model(dropout=0.0):
    """The conv and BN frozen (BN in inference), the dense trains."""
    model = conv_bn_model(dropout=dropout)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.arange(4, dtype="float32"))
    bn.moving_variance.assign(np.full(4, 9.0, "float32"))
    model.get_layer("conv").trainable = False
    bn.trainable = False
    return model


def test_frozen_weights_become_constants_and_compute_the_same():
    model = frozen_conv_model()
    frozen = trainability.frozen_weights(model, model.trainable_weights)
    assert {w.path for w in frozen} == {
        "conv/kernel", "conv/bias", "bn/gamma", "bn/beta", "bn/moving_mean", "bn/moving_variance"
    }
    forward = CompiledForward(model, frozen=frozen, constants=True)
    x = images()
    traced = tf.function(lambda x: forward(x, training=True))
    np.testing.assert_allclose(traced(x).numpy(), model(x, training=True).numpy(), rtol=1e-5, atol=1e-5)
    handles = lambda weights: {id(weight.value.handle) for weight in weights}
    read = lambda function: {id(tensor) for tensor in function.get_concrete_function(x).captured_inputs}
    assert read(traced) == handles(model.trainable_weights)  # Not one frozen variable is read.
    plain = tf.function(lambda x: CompiledForward(model, frozen=frozen, constants=False)(x, training=True))
    assert read(plain) == handles(model.weights)


def test_updates_inside_constant_weights_still_apply():
    # The BN trains (its statistics update) and dropout draws new masks, while the conv is constant.
    model = conv_bn_model(dropout=0.5)
    model.get_layer("conv").trainable = False
    frozen = trainability.frozen_weights(model, model.trainable_weights)
    assert {w.path for w in frozen} == {"conv/kernel", "conv/bias"}
    bn = model.get_layer("bn")
    x = images()
    traced = tf.function(lambda x: CompiledForward(model, frozen=frozen, constants=True)(x, training=True))
    first, second = traced(x).numpy(), traced(x).numpy()
    assert not np.array_equal(first, second)  # The seed generator's state advanced.
    after_constants = [w.numpy() for w in bn.non_trainable_weights]
    for weight in bn.non_trainable_weights:
        weight.assign(np.zeros(4) if "mean" in weight.path else np.ones(4))
    model(x, training=True)
    model(x, training=True)
    for a, b in zip(after_constants, [w.numpy() for w in bn.non_trainable_weights]):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def trainer_steps(strategy, *, constants, mode, steps=3):
    """Final weights after `steps` engine steps of a small_cnn classifier from a fixed start."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_classifier(backbone="small_cnn", image_size=16, channels=1, num_classes=3)
        for weight in model.get_layer("backbone").non_trainable_weights:  # Trained-like BN statistics.
            weight.assign(np.full(weight.shape, 0.02 if "mean" in weight.path else 1.5, "float32"))
        variables = trainability.apply(model, mode=mode, rule=trainability.Rule(unfreeze=2))
        optimizer = make_optimizer(
            name="adam", learning_rate=0.01, weight_decay=0.0, precision="float32", variables=variables
        )
    trainer = Trainer(
        model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8, variables=variables,
        frozen_as_constants=constants,
    )
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.integers(0, 255, (8 * steps, 16, 16, 1)).astype("uint8"), rng.integers(0, 3, 8 * steps))
    ).batch(8)
    sums = trainer.train_steps(iter(strategy.experimental_distribute_dataset(data)), tf.constant(steps))
    return {w.path: w.numpy() for w in model.weights}, sums.numpy(), variables


def test_the_trainer_fuses_batch_norm_only_when_asked():
    keras.utils.set_random_seed(0)
    model = build_classifier(backbone="small_cnn", image_size=16, channels=1, num_classes=3)
    variables = trainability.apply(model, mode="scratch")
    optimizer = make_optimizer(name="sgd", learning_rate=0.01, weight_decay=0.0, precision="float32",
                               variables=variables)
    data = tf.data.Dataset.from_tensors((np.zeros((8, 16, 16, 1), "uint8"), np.zeros(8, "int64"))).repeat()
    strategy = tf.distribute.get_strategy()
    for fused in (True, False):
        trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=8,
                          variables=variables, fused_batchnorm=fused)
        graph = trainer.train_steps.get_concrete_function(iter(data), tf.constant(1)).graph.as_graph_def()
        ops = {node.op for node in graph.node}  # And the tf.range loop's body, a function of its own:
        ops |= {node.op for function in graph.library.function for node in function.node_def}
        assert ("FusedBatchNormV3" in ops) == fused, fused


@pytest.mark.slow
def test_trainer_with_constants_trains_the_same_weights_and_never_moves_frozen_ones():
    for mode in ("frozen", "finetune"):
        for strategy in (one_device(), two_devices()):
            before, _, _ = trainer_steps(strategy, constants=False, mode=mode, steps=0)
            plain, plain_sums, variables = trainer_steps(strategy, constants=False, mode=mode)
            constant, constant_sums, _ = trainer_steps(strategy, constants=True, mode=mode)
            np.testing.assert_allclose(constant_sums, plain_sums, rtol=1e-5)
            trained = {w.path for w in variables}
            for path, value in constant.items():
                np.testing.assert_allclose(value, plain[path], rtol=1e-4, atol=1e-5, err_msg=path)
                if path not in trained:
                    np.testing.assert_array_equal(value, before[path], err_msg=path)
                else:
                    assert not np.array_equal(value, before[path]), path

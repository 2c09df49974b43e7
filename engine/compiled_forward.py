"""How the engine's compiled steps run the model: the same layers and variables as Keras' own call, two
ways faster on this CPU (measured on MobileNetV2 alpha 0.35 at 96 px, batch 64).

- BatchNorm that trains runs as TensorFlow's fused kernel (FusedBatchNormV3 and its fused gradient,
  what tf.keras 2 used) instead of Keras 3's composite of moments, subtract, multiply and add: one pass
  over the activations instead of several. A scratch training step ran 1.6-1.7x faster.
- Frozen weights enter the graph as constants (a snapshot taken when the step is traced; frozen
  weights never change, the audit proves it). Grappler then folds inference BatchNorm into the
  convolutions and oneDNN keeps its reordered filters: the frozen backbone's forward ran 1.5-1.7x
  faster. Done on CPU only, where it was measured (`Devices.frozen_as_constants`): on GPUs XLA
  already fuses the elementwise work, and constants would be copied into the graph once per replica.

Both act only inside the engine's traced steps: the model, its saved form and Keras' own `fit` on it
are untouched, which is what lets `--job=benchmark` compare the engine with `fit` on the same model.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from models.trainability import all_layers

_BN = keras.layers.BatchNormalization
_FUSED_MIN_EPSILON = 1.001e-5  # FusedBatchNormV3 raises smaller epsilons to this; keep Keras' there.


def _fused_batch_norm_call(layer, keras_call):
    """`layer.call` that computes a training-mode BatchNorm with the fused kernel, with Keras 3's
    semantics (biased batch variance in the moving average, float32 math, momentum); every other case
    (inference, masks, renorm, synchronized, other axes or ranks) goes to Keras' own call."""

    def call(inputs, training=None, mask=None):
        usable = (
            training and layer.trainable and mask is None and not layer.renorm
            and not getattr(layer, "synchronized", False) and len(inputs.shape) == 4
            and layer.axis in (-1, 3) and layer.epsilon >= _FUSED_MIN_EPSILON
        )
        if not usable:
            return keras_call(inputs, training=training, mask=mask)
        inputs = tf.cast(inputs, "float32")
        channels = inputs.shape[-1]
        scale = tf.cast(layer.gamma, "float32") if layer.scale else tf.ones([channels])
        offset = tf.cast(layer.beta, "float32") if layer.center else tf.zeros([channels])
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset, epsilon=layer.epsilon, is_training=True
        )
        # The kernel returns the unbiased variance; Keras' moving average uses the biased one.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
        variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
        momentum = layer.momentum
        layer.moving_mean.assign(tf.cast(layer.moving_mean, "float32") * momentum + mean * (1.0 - momentum))
        layer.moving_variance.assign(
            tf.cast(layer.moving_variance, "float32") * momentum + variance * (1.0 - momentum)
        )
        return tf.cast(outputs, layer.compute_dtype)

    return call


@contextlib.contextmanager
def fused_batch_norm(model):
    """While a step traces (enter it in the cross-replica part, around `strategy.run`), every
    BatchNorm layer of `model` computes training mode with the fused kernel. Instance attributes, so
    nothing outside the trace (another model, `fit`, a saved model) sees it."""
    layers = [layer for layer in all_layers(model) if isinstance(layer, _BN)]
    for layer in layers:
        layer.call = _fused_batch_norm_call(layer, type(layer).call.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.call


class _ReplayUpdates(keras.StatelessScope):
    """A StatelessScope that remembers the assignments made inside it (BatchNorm statistics, random
    seeds), so they can be applied when it exits: it exists here only to substitute values."""

    def __init__(self, state_mapping):
        super().__init__(state_mapping=state_mapping)
        self.updates = []

    def add_update(self, update):
        super().add_update(update)
        self.updates.append(update)


class CompiledForward:
    """Calls `model` inside a traced step, with `frozen` (weights that never change) as constants when
    `constants` is set. Call it in replica context; each replica traces its own constants."""

    def __init__(self, model, *, frozen, constants):
        self.model = model
        self.frozen = list(frozen) if constants else []

    def __call__(self, inputs, *, training):
        if not self.frozen:
            return self.model(inputs, training=training)
        with tf.init_scope():  # The weights' values now (eagerly), not a read inside the graph.
            values = [np.asarray(variable.numpy()) for variable in self.frozen]
        mapping = [(variable, tf.constant(value)) for variable, value in zip(self.frozen, values)]
        with _ReplayUpdates(mapping) as scope:
            outputs = self.model(inputs, training=training)
        for variable, value in scope.updates:
            variable.assign(value)
        return outputs

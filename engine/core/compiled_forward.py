"""How the engine's compiled steps run the model: the same layers and variables as Keras' own call, two
ways faster where measured (CPU; figures in docs/performance.md).

- BatchNorm that trains runs as TensorFlow's fused kernel (FusedBatchNormV3 and its fused gradient,
  what tf.keras 2 used) instead of Keras 3's composite of moments, subtract, multiply and add: one pass
  over the activations instead of several (`Devices.fused_batchnorm`, `--fused_batchnorm`). The patch
  itself lives with the other library internals, in internals.py.
- Frozen weights enter the graph as constants (a snapshot taken when the step is traced; frozen
  weights never change, the audit proves it). Grappler then folds inference BatchNorm into the
  convolutions and oneDNN keeps its reordered filters (`Devices.frozen_as_constants`, CPU only: on
  GPUs XLA already fuses the elementwise work, and constants would be copied into the graph once per
  replica). Keras' documented `StatelessScope` substitutes the constants and collects the updates made
  meanwhile (BatchNorm statistics, dropout seeds), which are then applied to the variables.

Both act only inside the engine's traced steps: the model, its saved form and Keras' own `fit` on it
are untouched.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from transfer_engine.internals import fused_batch_norm
from transfer_engine.models.trainability import all_layers


class CompiledForward:
    """Calls `model` inside a traced step, with `frozen` (weights that never change) as constants when
    `constants` is set. Call it in replica context; each replica traces its own constants. With
    `fused_batchnorm`, trace the step inside `self.fusing()`."""

    def __init__(self, model, *, frozen, constants, fused_batchnorm=False):
        self.model = model
        self.fused_batchnorm = fused_batchnorm
        self.frozen = list(frozen) if constants else []
        frozen_ids = {id(variable) for variable in self.frozen}
        # What a forward pass may assign: BatchNorm statistics and seed-generator states.
        self.updatable = [variable for variable in model.variables if id(variable) not in frozen_ids]

    def fusing(self):
        """Enter in the cross-replica part of a step's trace, around `strategy.run`: BatchNorm layers
        that train then trace as the fused kernel (when `fused_batchnorm`)."""
        return fused_batch_norm(all_layers(self.model)) if self.fused_batchnorm else contextlib.nullcontext()

    def __call__(self, inputs, *, training):
        if not self.frozen:
            return self.model(inputs, training=training)
        with tf.init_scope():  # The weights' values now (eagerly), not a read inside the graph.
            values = [np.asarray(variable.numpy()) for variable in self.frozen]
        mapping = [(variable, tf.constant(value)) for variable, value in zip(self.frozen, values)]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            outputs = self.model(inputs, training=training)
        for variable in self.updatable:
            value = scope.get_current_value(variable)
            if value is not None:
                variable.assign(value)
        return outputs

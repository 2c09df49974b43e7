"""The hand-written train and eval steps, run per replica with `strategy.run`.

One home for the loss: per-example cross-entropy on float32 logits, averaged over the *global* batch
(`tf.nn.compute_average_loss`), so summing gradients across replicas (the optimizer's all-reduce) gives
the gradient of the global batch's mean loss whatever the replica count. Under mixed float16 the loss is
scaled with the Keras 3 `LossScaleOptimizer.scale_loss`; `apply` unscales and skips non-finite steps.

Steps return per-replica sums (loss, correct, examples), reduced with SUM across replicas, so metrics
are exact for any replica count and for partial final eval batches.
"""

import functools

import keras
import tensorflow as tf

from engine.compiled_forward import CompiledForward, fused_batch_norm
from models import trainability

_SUM = tf.distribute.ReduceOp.SUM


def learning_rate_schedule(*, learning_rate, schedule, warmup_steps, total_steps):
    """Keras' own CosineDecay: to 0 over the run for "cosine"; for "constant", its alpha=1 form (no
    decay), which still gives the linear warm-up."""
    if schedule == "constant" and not warmup_steps:
        return learning_rate
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def make_optimizer(*, name, learning_rate, weight_decay, precision, variables, lr_multipliers=None):
    """A Keras 3 optimizer built over `variables`: every variable that will ever train in this run, so
    a staged run's later stages keep the optimizer state of earlier ones.

    Weight decay (if any) skips biases and BatchNorm parameters. `lr_multipliers` maps variables (by
    identity) to learning-rate multipliers (discriminative rates). Call inside `strategy.scope()`,
    before any step is traced: a Keras 3 optimizer built lazily inside a replicated step fails.
    """
    classes = {
        "adam": keras.optimizers.Adam,
        "sgd": functools.partial(keras.optimizers.SGD, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
        "adamw": keras.optimizers.AdamW,
    }
    optimizer = classes[name](
        learning_rate=learning_rate,
        weight_decay=weight_decay if (weight_decay or name == "adamw") else None,
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    inner = optimizer
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    if lr_multipliers and any(value != 1.0 for value in lr_multipliers.values()):
        _scale_learning_rates(inner, {
            inner._get_variable_index(variable): lr_multipliers.get(id(variable), 1.0)
            for variable in variables
        })
    return optimizer


def _scale_learning_rates(optimizer, multipliers):
    """Makes `optimizer` multiply its learning rate per variable (by index in its built variables).

    Keras 3 optimizers take one learning rate; their per-variable `update_step` is where a parameter
    group's rate belongs, so the instance's `update_step` is wrapped there.
    """
    update_step = optimizer.update_step

    def scaled_update_step(gradient, variable, learning_rate):
        multiplier = multipliers[optimizer._get_variable_index(variable)]
        return update_step(gradient, variable, learning_rate * multiplier if multiplier != 1.0 else learning_rate)

    optimizer.update_step = scaled_update_step


def per_example_loss(labels, logits):
    """Cross-entropy and correctness per example; one logit means binary (sigmoid), else softmax."""
    if logits.shape[-1] == 1:
        logits = logits[:, 0]
        loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, logits.dtype), logits=logits)
        predictions = tf.cast(logits > 0, labels.dtype)
    else:
        loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
        predictions = tf.argmax(logits, axis=-1, output_type=labels.dtype)
    return loss, tf.cast(tf.equal(predictions, labels), tf.float32)


def _sums(loss, correct, weights=None):
    if weights is None:
        weights = tf.ones_like(loss)
    loss, correct, weights = (tf.cast(value, tf.float64) for value in (loss, correct, weights))
    return tf.stack([tf.reduce_sum(loss * weights), tf.reduce_sum(correct * weights), tf.reduce_sum(weights)])


class Trainer:
    """Compiled training and evaluation loops for one model, optimizer, strategy and set of variables.

    Gradients are taken for `variables` only (models/trainability.py decides them), so frozen variables
    never reach the optimizer. A new set of variables (a new stage) is a new Trainer: one trace each.
    The steps call the model through engine/compiled_forward.py (fused BatchNorm; with
    `frozen_as_constants`, the frozen weights as graph constants).
    """

    def __init__(self, *, model, optimizer, strategy, global_batch_size, variables, jit_compile=False,
                 frozen_as_constants=False):
        self.model = model
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.variables = list(variables)
        self.forward = CompiledForward(
            model, frozen=trainability.frozen_weights(model, self.variables), constants=frozen_as_constants
        )
        replica_step = self._replica_train_step
        if jit_compile:  # XLA on the per-replica computation only, not on the distribution.
            replica_step = tf.function(replica_step, jit_compile=True)
        self._replica_step = replica_step
        self.train_steps = tf.function(self._train_steps)
        self.evaluate = tf.function(self._evaluate)

    def _replica_train_step(self, images, labels):
        with tf.GradientTape() as tape:
            logits = self.forward(images, training=True)
            loss, correct = per_example_loss(labels, logits)
            objective = tf.nn.compute_average_loss(loss, global_batch_size=self.global_batch_size)
            if self.model.losses:
                objective += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(objective)
        gradients = tape.gradient(scaled, self.variables)
        self.optimizer.apply(gradients, self.variables)
        return _sums(loss, correct)

    def _train_steps(self, iterator, num_steps):
        """Runs `num_steps` global steps in one call (a tf.range loop); returns summed metrics."""
        totals = tf.zeros([3], tf.float64)
        with fused_batch_norm(self.model):
            for _ in tf.range(num_steps):
                images, labels = next(iterator)
                per_replica = self.strategy.run(self._replica_step, args=(images, labels))
                totals += self.strategy.reduce(_SUM, per_replica, axis=None)
        return totals

    def _replica_eval_step(self, images, labels, weights):
        loss, correct = per_example_loss(labels, self.forward(images, training=False))
        return _sums(loss, correct, weights)

    def _evaluate(self, dataset):
        """One pass over a distributed eval dataset of (images, labels, weights); returns weighted sums
        of (loss, correct, examples): padding examples have weight 0."""
        totals = tf.zeros([3], tf.float64)
        for images, labels, weights in dataset:
            per_replica = self.strategy.run(self._replica_eval_step, args=(images, labels, weights))
            totals += self.strategy.reduce(_SUM, per_replica, axis=None)
        return totals


def summarize(totals):
    """(loss sum, correct, examples) -> {"loss", "accuracy", "examples"}."""
    loss, correct, examples = (float(value) for value in totals)
    examples = int(examples)
    return {
        "loss": loss / examples if examples else float("nan"),
        "accuracy": correct / examples if examples else float("nan"),
        "examples": examples,
    }

"""The hand-written train and eval steps, run per replica with `strategy.run`, and the stage schedule
that picks a run's Trainer per epoch.

One home for the loss: per-example cross-entropy on float32 logits (in training with --label_smoothing
and times --class_weight's weight of the example's class; evaluation reports the plain cross-entropy,
unweighted), averaged over the *global* batch
(`tf.nn.compute_average_loss`), so summing gradients across replicas (the optimizer's all-reduce) gives
the gradient of the global batch's mean loss whatever the replica count. Under mixed float16 the loss is
scaled with the Keras 3 `LossScaleOptimizer.scale_loss`; `apply` unscales and skips non-finite steps, which
every replica decides alike (`agreed_gradients`).

One home for evaluation: steps return sums of (loss, correct, examples), per class in evaluation,
reduced with SUM across replicas and workers, so every metric (per-class accuracy included) is exact
for any replica count, worker count and partial final batch.
"""

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from transfer_engine.engine.core.compiled_forward import CompiledForward
from transfer_engine.internals import quiet_native_info
from transfer_engine.engine.core.optimizer import averaged_weights
from transfer_engine.models import modes, trainability

_SUM = tf.distribute.ReduceOp.SUM


def per_example_loss(labels, logits, label_smoothing=0.0, targets=None):
    """Cross-entropy and correctness per example; one logit means binary (sigmoid), else softmax.

    `targets`, if given, are the class probabilities the loss aims at instead of `labels` (MixUp and
    CutMix's mixed labels, [examples, classes]); correctness is always against `labels`. With
    `label_smoothing` eps the targets become (1 - eps) targets + eps / classes (Keras' convention: eps / 2
    for a sigmoid's two classes)."""
    binary = logits.shape[-1] == 1
    if targets is None and not label_smoothing:
        if binary:
            loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(labels, logits.dtype), logits=logits[:, 0])
        else:
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    else:
        classes = 2 if binary else logits.shape[-1]
        targets = tf.one_hot(labels, classes, dtype=logits.dtype) if targets is None else tf.cast(targets, logits.dtype)
        targets = targets * (1 - label_smoothing) + label_smoothing / classes
        if binary:
            loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets[:, 1], logits=logits[:, 0])
        else:
            loss = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)
    return loss, tf.cast(tf.equal(predicted_class(logits, labels.dtype), labels), tf.float32)


def predicted_class(logits, dtype):
    """The class each example's logits pick: argmax, or for one logit (sigmoid) class 1 when positive."""
    if logits.shape[-1] == 1:
        return tf.cast(logits[:, 0] > 0, dtype)
    return tf.argmax(logits, axis=-1, output_type=dtype)


def flip_averaged(call, images):
    """Test-time augmentation (--tta): the mean of the logits of the images and of their mirror images."""
    return (call(images) + call(tf.image.flip_left_right(images))) / 2


def balanced_class_weights(class_counts):
    """Per-class loss weights inversely proportional to the classes' example counts, mean 1 over the
    classes (scikit-learn's "balanced", n / (classes x n_c), rescaled so the mean weight is 1)."""
    inverse = 1.0 / np.asarray(class_counts, np.float64)
    return (inverse / inverse.mean()).astype(np.float32)


def agreed_gradients(gradients):
    """Gradients whose finiteness every replica judges alike: if any replica's are not finite, every
    replica's become NaN. Keras 3's LossScaleOptimizer checks each replica's own gradients, before they are
    summed: with merge_call replica 0 alone decides (another's inf is then summed into every weight),
    without it (GPUs with XLA) replicas could take different branches around the all-reduce and hang.
    One scalar all-reduce per step; call in replica context, before `apply`."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return gradients
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in gradients if g is not None])
    overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32)) > 0
    return [g if g is None else tf.where(overflowed, tf.constant(float("nan"), g.dtype), g) for g in gradients]


def _sums(loss, correct, weights):
    """Per-example (loss, correct, 1) x weights, in float64: [examples, 3]."""
    values = tf.stack([loss, correct, tf.ones_like(loss)], axis=1)
    return tf.cast(values, tf.float64) * tf.cast(weights, tf.float64)[:, None]


class Trainer:
    """Compiled training and evaluation loops for one model, optimizer, strategy and set of variables.

    Gradients are taken for `variables` only (models/trainability.py decides them), so frozen variables
    never reach the optimizer. A new set of variables (a new stage) is a new Trainer: one trace each.
    The steps call the model through engine/core/compiled_forward.py.
    """

    def __init__(self, *, model, optimizer, strategy, global_batch_size, variables, jit_compile=False,
                 frozen_as_constants=False, fused_batchnorm=False, label_smoothing=0.0, class_weights=None,
                 tta=False):
        self.model = model
        self.tta = tta
        self.label_smoothing = label_smoothing
        self.class_weights = None if class_weights is None else tf.constant(class_weights, tf.float32)
        self.optimizer = optimizer
        self.strategy = strategy
        self.global_batch_size = global_batch_size
        self.variables = list(variables)
        self.num_classes = max(2, model.output.shape[-1])  # One logit: two classes.
        self.forward = CompiledForward(
            model, frozen=trainability.frozen_weights(model, self.variables), constants=frozen_as_constants,
            fused_batchnorm=fused_batchnorm,
        )
        # BatchNorm layers that train update their moving statistics on each replica from its own batch
        # (Keras creates them with aggregation "none"): `_train_steps` averages them across replicas.
        self.moving_statistics = [
            weight for layer in trainability.all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for weight in (layer.moving_mean, layer.moving_variance)
        ] if strategy.num_replicas_in_sync > 1 else []
        # XLA compiles per replica, never around the distribution. On one replica it takes the whole step; on
        # several, the forward and backward pass only: a synchronisation inside an XLA function (the
        # optimizer's all-reduce, its `iterations` update, the loss-scale agreement) takes tf.distribute's
        # path without merge_call on GPUs, where Keras 3's optimizer fails ("merge_call called while defining
        # a new graph"), even in float32.
        self._gradients, self._replica_step = self._replica_gradients, self._replica_train_step
        if jit_compile and strategy.num_replicas_in_sync == 1:
            self._replica_step = tf.function(self._replica_train_step, jit_compile=True)
        elif jit_compile:
            self._gradients = tf.function(self._replica_gradients, jit_compile=True)
        self.train_steps = tf.function(self._train_steps)
        self._evaluate_traced = tf.function(self._evaluate)
        self._predict_traced = tf.function(self._predict)

    def evaluate(self, dataset):
        """The sums of `_evaluate`, with the trained weights' moving averages in place (--ema). Evaluation
        prints nothing of its own, so native chatter is held back meanwhile (internals.quiet_native_info)."""
        with averaged_weights(self.optimizer, self.variables), quiet_native_info():
            return self._evaluate_traced(dataset)

    def predict(self, dataset):
        """Every example of a distributed dataset of (images, labels, weights, positions) through the model
        as `evaluate` calls it, gathered from every replica and worker: numpy (logits [n, outputs],
        per-example losses [n], labels [n], positions [n]), padding included (position -1), in the
        order gathered (engine/reports/predictions.py puts them in the examples' order)."""
        with averaged_weights(self.optimizer, self.variables), quiet_native_info():
            batches = [[value.numpy() for value in self._predict_traced(batch)] for batch in dataset]
        return tuple(np.concatenate(part) for part in zip(*batches))

    def _predict(self, batch):
        per_replica = self.strategy.run(self._replica_predict_step, args=tuple(batch))
        return [self.strategy.gather(value, axis=0) for value in per_replica]

    def _replica_predict_step(self, images, labels, weights, positions):
        logits = self._inference_logits(images)
        loss, _ = per_example_loss(labels, logits)
        return tf.cast(logits, tf.float32), loss, labels, positions

    def _replica_train_step(self, images, labels, targets=None):
        """One step on a replica's batch; `targets`: the batch's mixed labels (--mixup, --cutmix)."""
        gradients, sums = self._gradients(images, labels, targets)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            gradients = agreed_gradients(gradients)
        self.optimizer.apply(gradients, self.variables)
        return sums

    def _replica_gradients(self, images, labels, targets=None):
        """The (loss-scaled) gradients of a replica's batch and its sums of (loss, correct, examples)."""
        with tf.GradientTape() as tape:
            logits = self.forward(images, training=True)
            loss, correct = per_example_loss(labels, logits, self.label_smoothing, targets)
            if self.class_weights is not None:  # Of a mixed example: its classes' weights, mixed alike.
                loss *= (tf.gather(self.class_weights, labels) if targets is None
                         else tf.linalg.matvec(tf.cast(targets, tf.float32), self.class_weights))
            objective = tf.nn.compute_average_loss(loss, global_batch_size=self.global_batch_size)
            if self.model.losses:
                objective += tf.nn.scale_regularization_loss(tf.add_n(self.model.losses))
            scaled = self.optimizer.scale_loss(objective)
        return tape.gradient(scaled, self.variables), tf.reduce_sum(_sums(loss, correct, tf.ones_like(loss)), axis=0)

    def _train_steps(self, iterator, num_steps):
        """Runs `num_steps` global steps in one call (a tf.range loop); returns summed (loss, correct,
        examples). Then every replica's BatchNorm moving statistics become their mean across replicas: a
        moving average is linear, so that is the average of the replicas' batch statistics step by step,
        and checkpoints, model.keras and evaluation on any replica see the same statistics."""
        totals = tf.zeros([3], tf.float64)
        with self.forward.fusing():
            for _ in tf.range(num_steps):
                batch = next(iterator)  # (images, labels), and the mixed labels with --mixup, --cutmix.
                per_replica = self.strategy.run(self._replica_step, args=tuple(batch))
                totals += self.strategy.reduce(_SUM, per_replica, axis=None)
        for statistic in self.moving_statistics:
            replicas = self.strategy.experimental_local_results(statistic.value)
            statistic.value.assign(tf.add_n([tf.convert_to_tensor(value) for value in replicas]) / len(replicas))
        return totals

    def _inference_logits(self, images):
        """The model's logits in inference mode; with --tta, the mean of the images' and their mirrors'."""
        evaluate = lambda batch: self.forward(batch, training=False)
        return flip_averaged(evaluate, images) if self.tta else evaluate(images)

    def _replica_eval_step(self, images, labels, weights):
        logits = self._inference_logits(images)
        loss, correct = per_example_loss(labels, logits)
        predicted = tf.one_hot(predicted_class(logits, labels.dtype), self.num_classes, dtype=tf.float64)
        values = tf.concat([_sums(loss, correct, weights), predicted * tf.cast(weights, tf.float64)[:, None]], 1)
        return tf.math.unsorted_segment_sum(values, labels, self.num_classes)

    def _evaluate(self, dataset):
        """One pass over a distributed eval dataset of (images, labels, weights); returns weighted sums
        per true class of (loss, correct, examples, then examples predicted as each class: the confusion
        matrix's row), [classes, 3 + classes]: padding examples have weight 0."""
        totals = tf.zeros([self.num_classes, 3 + self.num_classes], tf.float64)
        for images, labels, weights in dataset:
            per_replica = self.strategy.run(self._replica_eval_step, args=(images, labels, weights))
            totals += self.strategy.reduce(_SUM, per_replica, axis=None)
        return totals


def summarize(totals, class_names=None):
    """Sums of (loss, correct, examples), [3], or evaluation's per class [classes, 3 + classes] ->
    {"loss", "accuracy", "examples"}, and for per-class sums "class_accuracy" {class name: accuracy, None
    without examples} and "confusion_matrix" (counts, rows the true class, columns the predicted one)."""
    totals = np.asarray(totals, np.float64)
    loss, correct, examples = totals[..., :3].reshape(-1, 3).sum(axis=0)
    examples = int(examples)
    result = {
        "loss": float(loss) / examples if examples else float("nan"),
        "accuracy": float(correct) / examples if examples else float("nan"),
        "examples": examples,
    }
    if totals.ndim == 2:
        names = class_names if class_names is not None else range(len(totals))
        result["class_accuracy"] = {
            name: float(right / count) if count else None for name, (_, right, count) in zip(names, totals[:, :3])
        }
        result["confusion_matrix"] = np.rint(totals[:, 3:]).astype(int).tolist()
    return result


class Stages:
    """The stage schedule of a run: epoch -> the Trainer of that epoch's mode (models/modes.py; a
    staged run trains the head alone first). Entering a stage sets what trains and traces its steps
    once; the optimizer, built over every stage's variables, carries its state across stages.

    `run` is the assembled run (engine/core/assembly.py); `step_model` is what the steps call, if not its
    model: the head on cached features (engine/core/feature_cache.py).
    """

    def __init__(self, run, *, step_model=None):
        config = run.config
        self.model, self.step_model = run.model, step_model or run.model
        self.run_mode = modes.of_run(config.mode, config.head_epochs)
        self.head_epochs = config.head_epochs
        self.rule = trainability.Rule.from_config(config)
        self.bn, self.lora_rank = config.bn, config.lora_rank
        self.optimizer, self.devices, self.batch_size = run.optimizer, run.devices, config.step_batch
        self.label_smoothing, self.tta = config.label_smoothing, config.tta
        self.class_weights = None
        if config.class_weight == "balanced":
            counts = run.source.class_counts(config.train_split)
            self.class_weights = balanced_class_weights(counts)
            logging.info("Class weights (balanced, from the train split's %s examples per class): %s",
                         "/".join(map(str, counts)), ", ".join(
                             f"{name} {weight:.3f}" for name, weight in zip(run.source.class_names, self.class_weights)))
        self.mode = self.trainer = None

    def __call__(self, epoch):
        mode = self.run_mode.stage(epoch, self.head_epochs)
        if mode is not self.mode:
            variables = trainability.apply(self.model, mode=mode.name, rule=self.rule, bn=self.bn,
                                           lora_rank=self.lora_rank)
            if self.mode is not None:
                logging.info("Stage %s from epoch %d: %d variables train", mode.name, epoch + 1, len(variables))
            devices = self.devices
            self.trainer = Trainer(
                model=self.step_model, optimizer=self.optimizer, strategy=devices.strategy,
                global_batch_size=self.batch_size, variables=variables, jit_compile=devices.jit_compile,
                frozen_as_constants=devices.frozen_as_constants, fused_batchnorm=devices.fused_batchnorm,
                label_smoothing=self.label_smoothing, class_weights=self.class_weights, tta=self.tta,
            )
            self.mode = mode
        return self.trainer

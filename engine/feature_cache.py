"""The frozen-mode feature cache (`--feature_cache=auto`).

When the backbone is frozen and the pixels do not change from epoch to epoch (no augmentation), the
backbone's output for an example is the same every epoch: computing it once and training the head on
it is exact and many times faster (TF Hub's retrain "bottlenecks"; the Keras transfer-learning
guide's "a lot faster & cheaper"). The backbone runs once per example, distributed and in inference
mode; the head that trains on the features is built from the classifier's own layers, so the trained
classifier (checkpoints, model.keras, audit) is the same object as without the cache.
"""

import dataclasses
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from engine.compiled_forward import CompiledForward
from models import modes

FEATURES_LAYER = "pool"  # The classifier's pooled backbone output: what the head reads.
HEAD_LAYERS = ("dropout", "logits")


def reason_not_to_cache(config):
    """None when the cache applies to `config`, else why not (worth a log line only where the user
    might have expected it: a mode the cache applies to, with augmentation)."""
    if config.feature_cache == "off":
        return "--feature_cache=off"
    if not modes.of_run(config.mode, config.head_epochs).feature_cache:
        return f"--mode={config.mode} trains the backbone"
    if config.augment != "none":
        return f"--augment={config.augment} changes the pixels every epoch, so every epoch needs the backbone"
    return None


def head_model(model):
    """Pooled features -> the classifier's own dropout and logits layers (shared, not copied)."""
    features = model.get_layer(FEATURES_LAYER).output
    inputs = keras.Input(features.shape[1:], dtype=features.dtype, name="features")
    x = inputs
    for name in HEAD_LAYERS:
        if any(layer.name == name for layer in model.layers):
            x = model.get_layer(name)(x)
    return keras.Model(inputs, x, name="head")


def extract(run, examples):
    """`examples` with each image replaced by its backbone features, in the same order (so the same
    seed shuffles them into the same batches). `run.eval_dataset` (engine/assembly.py) distributes them
    with weight-0 padding, so every replica and worker runs the same steps; the padding is dropped."""
    strategy = run.devices.strategy
    extractor = keras.Model(run.model.input, run.model.get_layer(FEATURES_LAYER).output)
    forward_pass = CompiledForward(
        extractor, frozen=extractor.weights, constants=run.devices.frozen_as_constants
    )

    def replica_step(images, labels, weights):
        return forward_pass(images, training=False), labels, weights

    @tf.function
    def run_all(dataset):  # One graph over the whole dataset.
        outputs = [tf.TensorArray(dtype, size=0, dynamic_size=True, infer_shape=False)
                   for dtype in (extractor.output.dtype, tf.int64)]
        index = tf.constant(0)
        for batch in dataset:
            features, labels, weights = (
                tf.concat(strategy.experimental_local_results(value), axis=0)  # This worker's, in order.
                for value in strategy.run(replica_step, args=batch)
            )
            real = weights > 0
            outputs = [array.write(index, tf.boolean_mask(value, real))
                       for array, value in zip(outputs, (features, labels))]
            index += 1
        return [array.concat() for array in outputs]

    if strategy.num_replicas_in_sync == 1:  # No distribution to do: a plain dataset and function.
        spec = examples.dataset.element_spec[0]
        forward = tf.function(  # One trace for every batch size, the last partial batch included.
            lambda images: forward_pass(images, training=False),
            input_signature=[tf.TensorSpec([None, *spec.shape], spec.dtype)],
        )
        # Inference keeps no activations for a backward pass, so 4x the training batch fits where
        # training fits (and ran faster than 1x where measured).
        batches = examples.dataset.batch(4 * run.config.batch_size).prefetch(tf.data.AUTOTUNE)
        features = np.concatenate([forward(images).numpy() for images, _ in batches])
        labels = np.concatenate([labels.numpy() for _, labels in batches])
    else:
        features, labels = (value.numpy() for value in run_all(run.eval_dataset(examples)))
    if len(labels) != examples.count:
        raise RuntimeError(f"feature extraction returned {len(labels)} examples, expected {examples.count}")
    dataset = tf.data.Dataset.from_tensor_slices((features, labels)).cache()
    return dataclasses.replace(examples, dataset=dataset)


@dataclasses.dataclass(frozen=True)
class Features:
    """A run's splits as backbone features, and the model that trains on them."""

    splits: dict  # {"train", "eval", "test": pipeline.Examples of features, or None}
    head: keras.Model  # The classifier's own head layers on the features (shared, not copied).
    report: dict  # {"examples": per split, "seconds"}: the one-time extraction, for results.json.


def build(run):
    """Runs the frozen backbone once over every split of `run` (engine/assembly.py)."""
    started = time.perf_counter()
    splits = {name: extract(run, examples) if examples else None for name, examples in run.splits.items()}
    seconds = time.perf_counter() - started
    counts = {name: examples.count for name, examples in splits.items() if examples}
    logging.info(
        "Feature cache: the frozen backbone ran once over %d examples in %.1f s; the head trains on "
        "%d-d features", sum(counts.values()), seconds, splits["train"].dataset.element_spec[0].shape[-1],
    )
    return Features(splits=splits, head=head_model(run.model), report={"examples": counts, "seconds": seconds})

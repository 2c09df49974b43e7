"""The feature cache (`--feature_cache=auto`): the frozen lower part of the classifier, run once per example.

Below the lowest layer that trains (and below any layer that computes differently in training, such as
Dropout), with no augmentation, the classifier computes the same activations for an example every
epoch. The cache runs that lower part once per example, in inference mode and distributed over the
replicas, and trains the upper part on the cached activations: exact, and the lower part's forward
pass is never paid again (TF Hub's retrain "bottlenecks"; the Keras transfer-learning guide's "a lot
faster & cheaper").

Where to cut: the deepest tensor below every such layer through which everything above flows, so never
inside a residual block whose skip starts below it. In frozen mode that is the pooled backbone output
(the head reads it); in finetune (and a staged run, for both its stages) it is inside the backbone,
below the first layer the rule unfreezes. The upper part is built from the classifier's own layers
(shared, not copied), so the trained classifier (checkpoints, model.keras, the audit) is the same
object as without the cache.

Size: estimated before extraction (examples x activation size, in the dtype the activations are
computed in) and logged. Above --feature_cache_max_gb the activations go to files under --cache when
it is a directory (reused by later runs with the same frozen part and split), else the run trains
live and says why.
"""

import dataclasses
import functools
import hashlib
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from transfer_engine.data import pipeline
from transfer_engine.engine.core.compiled_forward import CompiledForward
from transfer_engine.models import modes
from transfer_engine.models.classifier import BACKBONE_LAYER

# Layers whose output is random in training: they must run live, above the cut.
_RANDOM_LAYERS = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D, keras.layers.SpatialDropout2D,
    keras.layers.SpatialDropout3D, keras.layers.GaussianDropout, keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)


def reason_not_to_cache(config):
    """None when the cache may apply to `config`, else why not (worth a log line only where the user
    might have expected it: a mode the cache applies to, with augmentation)."""
    if config.feature_cache == "off":
        return "--feature_cache=off"
    if not modes.of_run(config.mode, config.head_epochs).feature_cache:
        return f"--mode={config.mode} trains the backbone's first layers"
    if config.augment != "none":
        return f"--augment={config.augment} changes the pixels every epoch, so every epoch needs the backbone"
    if config.mixup or config.cutmix:
        return "--mixup and --cutmix mix the images of every batch anew, so every epoch needs the backbone"
    if config.tta:
        return "--tta evaluates every image mirrored too, which the cache does not hold"
    return None


def max_bytes(config):
    """--feature_cache_max_gb in bytes; by default a quarter of this machine's memory."""
    return pipeline.memory_budget(config.feature_cache_max_gb, share=4)


def _computes_in_training(layer):
    """Whether `layer` trains or computes differently in training: it must run live, above the cut."""
    if layer.trainable_weights or isinstance(layer, _RANDOM_LAYERS):
        return True
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def backbone_cut(backbone):
    """(tensor, layer name) of the deepest tensor of `backbone` below its first layer that computes in
    training, through which every later layer's inputs flow, with a layer of weights below it; None if
    there is none."""
    layers = backbone.layers  # Topological order; layers[0] is the InputLayer.
    try:
        inputs = [[]] + [[id(tensor) for tensor in keras.tree.flatten(layer.input)] for layer in layers[1:]]
    except (AttributeError, ValueError):  # A layer called twice has no single input: no graph to cut.
        return None
    last_use = {}
    for index, tensors in enumerate(inputs):
        for tensor in tensors:
            last_use[tensor] = index
    for tensor in keras.tree.flatten(backbone.output):
        last_use[id(tensor)] = len(layers)
    live, cut, weighted = {}, None, False
    for index, layer in enumerate(layers):
        if index and _computes_in_training(layer):
            break
        weighted = weighted or bool(layer.weights)
        live.update((id(tensor), tensor) for tensor in keras.tree.flatten(layer.output))
        live = {key: tensor for key, tensor in live.items() if last_use.get(key, -1) > index}
        if len(live) == 1 and weighted:
            cut = (next(iter(live.values())), layer.name)
    return cut


@dataclasses.dataclass(frozen=True)
class Cut:
    """The classifier split in two at the cut, both parts built from its own layers."""

    layer: str  # The layer whose output is cached.
    lower: keras.Model  # Raw images -> activations at the cut; runs once per example.
    upper: keras.Model  # Activations -> logits: what trains.


def find_cut(model):
    """Where to cut `model` with its layers' trainable flags as they stand (set them for the run's
    widest stage first); None when nothing below its first trained layer is worth caching."""
    backbone = model.get_layer(BACKBONE_LAYER)
    position = model.layers.index(backbone)
    below, above = model.layers[1:position], model.layers[position + 1:]  # preprocess; pool, dropout, logits
    found = backbone_cut(backbone)
    if found is None:
        return None
    tensor, layer = found
    whole_backbone = tensor is keras.tree.flatten(backbone.output)[0]
    lifted = 0  # With the whole backbone frozen, the cut goes on up through the layers above it.
    while whole_backbone and lifted < len(above) and not _computes_in_training(above[lifted]):
        layer, lifted = above[lifted].name, lifted + 1

    image = keras.Input(model.input.shape[1:], dtype=model.input.dtype, name="image")
    x = image
    for part in below:
        x = part(x)
    x = backbone(x) if whole_backbone else keras.Model(backbone.input, tensor, name="below_cut")(x)
    for part in above[:lifted]:
        x = part(x)
    lower = keras.Model(image, x, name="lower")
    features = keras.Input(x.shape[1:], dtype=x.dtype, name="features")
    y = features if whole_backbone else keras.Model(tensor, backbone.output, name="above_cut")(features)
    for part in above[lifted:]:
        y = part(y)
    return Cut(layer=layer, lower=lower, upper=keras.Model(features, y, name="upper"))


@dataclasses.dataclass(frozen=True)
class Features:
    """A run's splits as activations at the cut, and the model that trains on them."""

    splits: dict  # {"train", "eval", "test": pipeline.Examples of activations, or None}
    cut: Cut
    report: dict  # The one-time extraction, for results.json.

    @property
    def upper(self):
        """What trains on the activations: the classifier's own layers above the cut."""
        return self.cut.upper


def build(run):
    """The run's splits as activations at its cut (engine/core/assembly.py's `Run`, with the trainable flags
    of its widest stage); None, with a log line saying why, when the cache cannot help or fit."""
    cut = find_cut(run.model)
    if cut is None:
        logging.info("Feature cache off: the lowest layer that trains is the backbone's first")
        return None
    spec = cut.lower.output
    per_example = int(np.prod(spec.shape[1:])) * tf.as_dtype(spec.dtype).size
    examples = {name: split.count for name, split in run.splits.items() if split}
    total = per_example * sum(examples.values())
    budget = max_bytes(run.config)
    directory = None
    if total > budget:
        if run.config.cache in ("memory", "none"):
            logging.info(
                "Feature cache off: the activations at %s (%s) would take %s, over --feature_cache_max_gb "
                "(%s); set --cache to a directory to keep them on disk", cut.layer, _shape(spec),
                _size(total), _size(budget),
            )
            return None
        directory = os.path.join(run.config.cache, "features")
    logging.info(
        "Feature cache: below %s the model is frozen; its output (%s %s, %s per example) for %d examples "
        "takes %s %s", cut.layer, _shape(spec), spec.dtype, _size(per_example), sum(examples.values()),
        _size(total), f"on disk in {directory}" if directory else "in memory",
    )
    started = time.perf_counter()
    splits = {name: extract(run, cut.lower, split, directory=directory) if split else None
              for name, split in run.splits.items()}
    seconds = time.perf_counter() - started
    logging.info("Feature cache: the part below %s ran once over %d examples in %.1f s",
                 cut.layer, sum(examples.values()), seconds)
    report = {"cut": cut.layer, "shape": list(spec.shape[1:]), "dtype": spec.dtype, "bytes": total,
              "where": directory or "memory", "examples": examples, "seconds": seconds}
    return Features(splits=splits, cut=cut, report=report)


class Extractor:
    """Runs `lower` (engine/core/assembly.py's `run` gives devices and batches) once per example."""

    def __init__(self, run, lower):
        self.run, self.lower = run, lower
        strategy = run.devices.strategy
        forward = CompiledForward(lower, frozen=lower.weights, constants=run.devices.frozen_as_constants)

        def replica_step(images, labels, weights):
            return forward(images, training=False), labels, weights

        @tf.function
        def step(batch):
            outputs = strategy.run(replica_step, args=batch)
            return [tf.concat(strategy.experimental_local_results(value), axis=0) for value in outputs]  # In order.

        self._step = step

    def batches(self, examples):
        """(activations, labels) of `examples` in order, a training batch at a time (on CPU, larger
        batches extracted slower: 450 against 610 images/sec at 4x; see docs/performance.md). The batches come from
        `run.eval_dataset`, padded with weight-0 examples so every replica
        and worker runs the same steps; the padding is dropped."""
        run = self.run
        for batch in run.eval_dataset(examples):
            features, labels, weights = (value.numpy() for value in self._step(batch))
            yield features[weights > 0], labels[weights > 0]


def extract(run, lower, examples, *, directory=None):
    """`examples` with each image replaced by its activations from `lower`, in the same order (so the
    same seed shuffles them into the same batches): in memory, or in files under `directory`."""
    batches = functools.partial(Extractor(run, lower).batches, examples)
    if directory is None:
        features, labels = (np.concatenate(parts) for parts in zip(*batches()))
        count = len(labels)
        dataset = tf.data.Dataset.from_tensor_slices((features, labels)).cache()
    else:
        count, dataset = _on_disk(run, lower, examples, batches, directory)
    if count != examples.count:
        raise RuntimeError(f"feature extraction returned {count} examples, expected {examples.count}")
    return dataclasses.replace(examples, dataset=dataset)


def _on_disk(run, lower, examples, batches, directory):
    """(count, dataset) of activations written batch by batch to TFRecord files (one serialized tensor a
    record) in a folder named by what determines them, reused when complete."""
    folder = os.path.join(directory, folder_name(run, lower, examples))
    paths = {name: os.path.join(folder, f"{name}.tfrecord") for name in ("features", "labels", "count")}
    if not os.path.exists(paths["count"]):
        os.makedirs(folder, exist_ok=True)
        count = 0
        with tf.io.TFRecordWriter(paths["features"]) as features, tf.io.TFRecordWriter(paths["labels"]) as labels:
            for feature_batch, label_batch in batches():
                features.write(tf.io.serialize_tensor(feature_batch).numpy())
                labels.write(tf.io.serialize_tensor(label_batch).numpy())
                count += len(label_batch)
        with open(paths["count"] + ".tmp", "w") as f:  # Written last: the folder is complete.
            f.write(str(count))
        os.replace(paths["count"] + ".tmp", paths["count"])
    with open(paths["count"]) as f:
        count = int(f.read())
    spec = lower.output
    parts = [
        tf.data.TFRecordDataset(paths[name]).map(
            lambda record, dtype=dtype, shape=shape: tf.ensure_shape(tf.io.parse_tensor(record, dtype), shape)
        )
        for name, dtype, shape in (("features", spec.dtype, [None, *spec.shape[1:]]), ("labels", tf.int64, [None]))
    ]
    return count, tf.data.Dataset.zip(tuple(parts)).unbatch()


def folder_name(run, lower, examples):
    """The on-disk cache's folder for `examples` below `lower`: a hash of everything that determines the
    activations (the part's weights, the examples' source, selection rule, split and size, the worker)."""
    key = hashlib.sha1(repr((
        lower.output.shape, lower.output.dtype, examples.split.source.name, examples.split.source.contents,
        examples.split.source.label_subset,
        examples.split.source.split_scheme, examples.split.name, run.config.image_size, run.worker,
    ) + ((run.config.max_image_pixels,) if run.config.max_image_pixels != pipeline.MAX_IMAGE_PIXELS else ())).encode())
    for weight in lower.weights:
        key.update(np.asarray(weight.numpy()).tobytes())
    return key.hexdigest()[:16]


def _shape(spec):
    return "x".join(str(size) for size in spec.shape[1:])


def _size(size):
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000

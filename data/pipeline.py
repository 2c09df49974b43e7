"""The tf.data input pipeline, distributed with `strategy.distribute_datasets_from_function`.

Per worker, once: read its shard (by example) -> parallel decode and resize to uint8 at `image_size`
-> skip undecodable images -> cache (memory, files, or none) -> one counting pass, which fills the cache
and tells exactly how many examples decoded. Then per epoch: seeded shuffle -> augmentation (after the
cache, so every epoch draws new crops and flips from one decode) -> per-replica batches -> MixUp or
CutMix of each batch (then a third element, the mixed soft labels) -> prefetch.

Pixel scaling and grayscale-to-RGB are not done here: the model's own preprocessing does them
(models/classifier.py), so the cache holds one channel for grayscale data and the saved model carries
its preprocessing.

Training is one stream for the whole run: epoch e is `shuffle(seed of e)` over the cached examples, cut
to exactly `batches_per_epoch`; augmentation draws from stateless seeds (seed, epoch, position). Every
epoch is therefore a pure function of (seed, epoch): a run can start its stream at any epoch and see
exactly what an uninterrupted run saw. Keras' own RandAugment, MixUp and CutMix layers draw from a
seed-generator variable; `stateless` hands them the example's (or batch's) seed instead, through Keras'
StatelessScope, so they are pure functions of their seeds too (and safe in a parallel map).
Evaluation reads each example exactly once.
"""

import contextlib
import dataclasses
import fcntl
import glob
import os
import re
import time
import uuid

import keras
import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_BUFFER = 10_000
SHUFFLE_GRAPH_SEED = 1  # See train_dataset.


@dataclasses.dataclass(frozen=True)
class Worker:
    """This process's share of the input: worker `index` of `count` (one input pipeline per worker)."""

    index: int = 0
    count: int = 1

    def shard_size(self, num_examples):
        return num_examples // self.count + (self.index < num_examples % self.count)


@dataclasses.dataclass(frozen=True)
class Examples:
    """A split's examples on this worker: decoded, resized and cached, and how many there are."""

    split: object  # data.sources.Split
    dataset: tf.data.Dataset  # (uint8 image [size, size, channels] or its features, label)
    count: int  # Examples that decoded.
    skipped: int  # Examples of the shard that did not decode.
    class_counts: tuple = ()  # Examples that decoded, per class.
    undecodable: tuple = ()  # Names of the examples that did not (Source.example_name).


def options(deterministic):
    """tf.data options, set deliberately rather than inherited."""
    result = tf.data.Options()
    # Parallel map results in order (reproducible) or as they finish (faster).
    result.deterministic = deterministic
    # Each map call runs its ops on one thread; parallelism comes from num_parallel_calls (the tf.data
    # performance guide's advice), so decoding does not fight the training step for cores.
    result.threading.max_intra_op_parallelism = 1
    return result


# Images with more pixels are skipped unread (--max_image_pixels): a 1.2 MB PNG of 20000x20000 pixels took
# 7.6 GB to decode. PIL's limit for its decompression-bomb warning: 0.25 GB of RGB pixels.
MAX_IMAGE_PIXELS = 89_478_485


def decode(encoded, *, image_size, channels, max_pixels=MAX_IMAGE_PIXELS):
    """Encoded image bytes (JPEG, PNG, BMP, GIF's first frame; gray, gray+alpha, RGB or RGBA) -> uint8
    [image_size, image_size, channels]: alpha dropped, gray repeated to RGB or RGB averaged to gray. An
    image whose header says it has more than `max_pixels` pixels fails before it is decoded (the
    pipelines skip and name what fails)."""
    too_large = tf.debugging.assert_less_equal(
        header_pixels(encoded), tf.constant(max_pixels, tf.int64), message="more pixels than --max_image_pixels")
    with tf.control_dependencies([too_large]):
        # Its own channels (decode_image's default): not every format converts.
        image = tf.io.decode_image(encoded, expand_animations=False)
    return conform(image, image_size=image_size, channels=channels)


def header_pixels(encoded):
    """Width x height from an encoded image's header, without decoding it (JPEG, PNG, GIF, BMP; 0 for
    another format or a header too short, which decoding then refuses)."""
    length = tf.strings.length(encoded)

    def integers(start, count, size, little_endian):
        raw = tf.io.decode_raw(tf.strings.substr(encoded, start, count * size), tf.uint8)
        raw = tf.cast(tf.reshape(raw, [count, size]), tf.int64)
        raw = raw[:, ::-1] if little_endian else raw
        return tf.reduce_sum(raw * (256 ** tf.range(size - 1, -1, -1, dtype=tf.int64)), axis=1)

    def signed(value, bits):  # BMP's height is negative for top-down rows.
        return tf.abs(tf.where(value >= 2 ** (bits - 1), value - 2 ** bits, value))

    magic = tf.strings.substr(encoded, 0, 4)
    jpeg = lambda: tf.reduce_prod(tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64))
    png = lambda: tf.reduce_prod(integers(16, 2, 4, little_endian=False))
    gif = lambda: tf.reduce_prod(integers(6, 2, 2, little_endian=True))
    bmp = lambda: tf.reduce_prod(signed(integers(18, 2, 4, little_endian=True), 32))
    return tf.case([
        (tf.logical_and(tf.strings.substr(magic, 0, 2) == b"\xff\xd8", length >= 4), jpeg),
        (tf.logical_and(magic == b"\x89PNG", length >= 24), png),
        (tf.logical_and(tf.strings.substr(magic, 0, 3) == b"GIF", length >= 10), gif),
        (tf.logical_and(tf.strings.substr(magic, 0, 2) == b"BM", length >= 26), bmp),
    ], default=lambda: tf.constant(0, tf.int64), exclusive=True)


def conform(image, *, image_size, channels):
    """A uint8 image [height, width, 1 to 4 channels] as training sees it: decode's part after decoding
    (the Python API's predict on arrays of images runs it too)."""
    image = to_channels(image, channels)
    image.set_shape([None, None, channels])
    if image.shape[0] != image_size or image.shape[1] != image_size:
        image = tf.image.resize(image, [image_size, image_size])
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image


def to_channels(images, channels):
    """uint8 images (one or a batch) with 1 to 4 channels -> `channels` (1 or 3), as training converts
    them: alpha dropped, gray repeated to RGB or RGB averaged to gray (the SavedModel's input does it too)."""
    native = images.shape[-1] or tf.shape(images)[-1]  # Known (an array's) or not (a decoded file's).
    kept = native - 1 + native % 2  # Without alpha: 1, 2 -> gray; 3, 4 -> RGB.
    images = images[..., :kept]
    either = lambda rgb, gray: (rgb if kept == 3 else gray)() if isinstance(kept, int) else tf.cond(kept == 3, rgb, gray)
    if channels == 1:
        return either(lambda: tf.image.rgb_to_grayscale(images), lambda: images)
    return either(lambda: images, lambda: tf.image.grayscale_to_rgb(images))


def memory_budget(gigabytes, share):
    """A cache's budget in bytes: `gigabytes` (a --*_max_gb flag) if given, else 1/`share` of this machine's
    memory (the image cache's and the feature cache's, engine/core/assembly.py and engine/core/feature_cache.py)."""
    if gigabytes is not None:
        return int(gigabytes * 1e9)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // share


def prepare(split, *, image_size, cache="memory", worker=Worker(), deterministic=True, max_pixels=MAX_IMAGE_PIXELS):
    """Decodes, resizes and caches this worker's shard of `split`, counting what decoded.

    `cache` is "memory", "none", or a directory for cache files (reused by later runs with the same
    split, selection scheme, size and label subset). Undecodable images are skipped, and named (a
    second pass, only when there are some).
    """
    channels = split.source.channels
    dataset = split.source.read(split.name)
    if worker.count > 1:
        dataset = dataset.shard(worker.count, worker.index)
    # In the split's order whatever --deterministic says: example i is the split's file i (top_losses.png and
    # --job=inspect name examples by position), and the cache keeps that order.
    dataset = dataset.map(
        lambda image, label: (decode(image, image_size=image_size, channels=channels, max_pixels=max_pixels), label),
        num_parallel_calls=AUTOTUNE, deterministic=True,
    ).ignore_errors()
    if cache == "memory":
        dataset = dataset.cache()
    elif cache != "none":
        source = split.source
        limit = f"max{max_pixels}px" if max_pixels != MAX_IMAGE_PIXELS else ""  # What the cache holds.
        name = "_".join(filter(None, (source.name, source.split_scheme, source.contents, str(source.label_subset),
                                      split.name, f"{image_size}px", limit, f"{worker.index}of{worker.count}")))
        file_cache = FileCache(cache, re.sub(r"[^\w.-]+", "_", name))
        decoded, dataset = dataset, file_cache.cache(dataset)
    dataset = dataset.with_options(options(deterministic))
    class_counts = np.zeros(split.source.num_classes, np.int64)
    for labels in dataset.map(lambda image, label: label).batch(8192).as_numpy_iterator():
        class_counts += np.bincount(labels, minlength=len(class_counts))
    if cache not in ("memory", "none"):  # The counting pass wrote it: from now on, read what was published.
        dataset = file_cache.published(decoded).with_options(options(deterministic))
    count = int(class_counts.sum())
    skipped = worker.shard_size(split.num_examples) - count
    return Examples(
        split=split, dataset=dataset, count=count, skipped=skipped, class_counts=tuple(int(n) for n in class_counts),
        undecodable=_undecodable(split, worker, image_size, channels, max_pixels) if skipped else (),
    )


class FileCache:
    """`--cache=DIR` files of one split, which runs on this and other machines may share at the same time.

    TensorFlow's file cache refuses a second writer (AlreadyExistsError on its lockfile) and a killed
    writer's leftovers (the same, once). So each run writes files of its own (NAME.writing-ID), holding a
    lock on NAME.writing-ID.lock while it writes, and publishes them as NAME when its pass is complete,
    unless another run published first; NAME.index, renamed last, says NAME is complete. The files of a
    writer whose lock is free (it was killed) are removed by the next run."""

    def __init__(self, directory, name):
        self.final = os.path.join(directory, name)
        self.private = None  # This run's files, while it writes them.
        self._lock = None

    def cache(self, dataset):
        """`dataset` cached to the published files if they are complete, else to this run's own."""
        os.makedirs(os.path.dirname(self.final), exist_ok=True)
        self._sweep()
        if os.path.exists(self.final + ".index"):
            return dataset.cache(self.final)
        self.private = f"{self.final}.writing-{uuid.uuid4().hex[:12]}"
        self._lock = open(self.private + ".lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        return dataset.cache(self.private)

    def published(self, dataset):
        """After one complete pass over what `cache` returned: `dataset` cached to the published files."""
        if self.private:
            with open(os.path.join(os.path.dirname(self.final), ".publishing.lock"), "w") as publishing:
                fcntl.flock(publishing, fcntl.LOCK_EX)  # One publisher at a time: two runs' files never mix.
                if not os.path.exists(self.final + ".index"):
                    for data in glob.glob(glob.escape(self.private) + ".data-*"):
                        os.replace(data, self.final + data[len(self.private):])
                    os.replace(self.private + ".index", self.final + ".index")  # Last: NAME is complete.
            _remove_writer(self.private)
            self._lock.close()
            self.private = self._lock = None
        return dataset.cache(self.final)

    def _sweep(self):
        """Removes the files of writers of NAME that died before publishing."""
        for lock in glob.glob(glob.escape(self.final) + ".writing-*.lock"):
            try:
                handle = open(lock)
            except FileNotFoundError:
                continue  # Another run swept it.
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # Its writer is alive.
                _remove_writer(lock[:-len(".lock")])


def _remove_writer(prefix):
    """A cache writer's files: its own (PREFIX.index, PREFIX.data-*, PREFIX.lock) and TensorFlow's while it
    writes (PREFIX_0.lockfile, PREFIX_0.data-*.tempstate*)."""
    for path in glob.glob(glob.escape(prefix) + ".*") + glob.glob(glob.escape(prefix) + "_*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _undecodable(split, worker, image_size, channels, max_pixels):
    """Names of this worker's examples of `split` that `decode` skips."""
    indexed = split.source.read(split.name).enumerate()
    if worker.count > 1:
        indexed = indexed.shard(worker.count, worker.index)
    everything = indexed.map(lambda index, example: index)
    decoded = indexed.map(
        lambda index, example: (index, decode(example[0], image_size=image_size, channels=channels, max_pixels=max_pixels))
    ).ignore_errors().map(lambda index, image: index)
    missing = set(everything.as_numpy_iterator()) - set(decoded.as_numpy_iterator())
    return tuple(split.source.example_name(split.name, int(index)) for index in sorted(missing))


def epoch_steps(examples, global_batch_size, num_workers=1, cap=None):
    """Full global steps per epoch that this worker's examples fill (dropping the remainder)."""
    steps = examples.count // (global_batch_size // num_workers)
    return min(steps, cap) if cap else steps


def stateless(layer, inputs, seed):
    """Calls a Keras random preprocessing layer with its seed generator's state replaced by `seed` (an
    int64 pair): the same seed gives the same output, and the layer's own state never moves."""
    state = layer.generator.state
    with keras.StatelessScope(state_mapping=[(state, tf.cast(seed, state.dtype))]):
        return layer(inputs, training=True)


def to_pixels(images):
    """Float images in [0, 255] -> uint8, what the cache holds and the model takes."""
    return tf.cast(tf.clip_by_value(tf.round(images), 0, 255), tf.uint8)


class Augmentation:
    """Training augmentation after the cache: per example (`mode`: flip, flip_crop, randaugment: flips
    then Keras' RandAugment, 2 of its 11 operations at magnitude 0.5), then per batch Keras' MixUp
    (`mixup`: its Beta alpha) or CutMix (`cutmix`: its Beta alpha); with both, each batch takes one of
    the two at random. Mixed batches carry soft labels besides the unmixed ones."""

    def __init__(self, mode="none", mixup=0.0, cutmix=0.0, num_classes=2):
        self.mode, self.num_classes = mode, num_classes
        # float32 whatever the global policy: Keras layers built under mixed_float16 (--precision, auto on
        # GPUs) compute in float16, which MixUp and CutMix cannot mix with their float32 draws.
        pixels = dict(dtype="float32")
        self.randaugment = keras.layers.RandAugment(value_range=(0, 255), **pixels) if mode == "randaugment" else None
        self.mixers = [layer for layer in (
            keras.layers.MixUp(alpha=mixup, **pixels) if mixup else None,
            keras.layers.CutMix(factor=cutmix, **pixels) if cutmix else None,
        ) if layer is not None]

    @classmethod
    def of(cls, config, num_classes):
        """A run's augmentation, from its --augment, --mixup and --cutmix."""
        return cls(config.augment, config.mixup, config.cutmix, num_classes)

    def example(self, image, seed):
        """`flip`: random left-right flip; `flip_crop`: also a random crop of the image padded by an
        eighth (reflected); `randaugment`: the flip, then RandAugment."""
        flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        if self.mode == "flip_crop":
            size = image.shape[0]
            pad = max(1, size // 8)
            padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
            image = tf.image.stateless_random_crop(padded, tf.shape(image), crop_seed)
        elif self.randaugment is not None:
            image = to_pixels(stateless(self.randaugment, image, crop_seed))
        return image

    def batch(self, images, labels, seed):
        """(mixed images, the unmixed labels, the mixed labels as class probabilities)."""
        choice_seed, mix_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        inputs = {"images": images, "labels": tf.one_hot(labels, self.num_classes)}

        def mix(layer):
            mixed = stateless(layer, inputs, mix_seed)
            return to_pixels(mixed["images"]), mixed["labels"]

        if len(self.mixers) == 1:
            mixed = mix(self.mixers[0])
        else:
            use_first = tf.random.stateless_uniform([], choice_seed) < 0.5
            mixed = tf.cond(use_first, lambda: mix(self.mixers[0]), lambda: mix(self.mixers[1]))
        return mixed[0], labels, mixed[1]


def train_dataset(examples, *, batch_size, batches_per_epoch, seed, epochs, first_epoch=0, skip_batches=0,
                  augmentation=Augmentation(), shuffle_buffer=SHUFFLE_BUFFER, deterministic=True):
    """Per-replica batches of (images, labels) for epochs `first_epoch` to `epochs` - 1, less the first
    `skip_batches` (a resumed run's position in its epoch); see the module docstring.
    `batches_per_epoch` counts this worker's batches: steps x local replicas. The stream ends with
    the run, so no background thread outlives it."""

    def epoch(index):
        # A shuffle's seed pair is (graph seed, op seed). Fixing this function graph's own seed makes the
        # order depend on `seed` alone, not on the process's global seed, and keeps a global seed of 0
        # (--seed=0) from reaching TensorFlow's check for the (0, 0) pair, which fails on a tensor seed.
        tf.random.set_seed(SHUFFLE_GRAPH_SEED)
        epoch_seed = seed * 1_000_003 + index
        shuffled = examples.dataset.shuffle(shuffle_buffer or examples.count, seed=epoch_seed)
        if augmentation.mode != "none":
            shuffled = shuffled.enumerate().map(
                lambda position, example: (
                    augmentation.example(example[0], tf.stack([epoch_seed, position])), example[1]
                ),
                num_parallel_calls=AUTOTUNE,
            )
        batches = shuffled.batch(batch_size, drop_remainder=True).take(batches_per_epoch)
        if augmentation.mixers:  # Seeds apart from the examples': (epoch seed, -1 - batch).
            batches = batches.enumerate().map(
                lambda index, batch: augmentation.batch(*batch, tf.stack([epoch_seed, -1 - index])),
                num_parallel_calls=AUTOTUNE,
            )
        return batches

    stream = tf.data.Dataset.range(first_epoch, epochs).flat_map(epoch).skip(skip_batches)
    return stream.prefetch(AUTOTUNE).with_options(options(deterministic))


def eval_steps(split, global_batch_size, worker=Worker()):
    """Global steps that cover the largest worker shard of `split`, padding included."""
    worker_batch = global_batch_size // worker.count
    largest_shard = -(-split.num_examples // worker.count)
    return -(-largest_shard // worker_batch)


def eval_dataset(examples, *, batch_size, steps, local_replicas=1, deterministic=True, positions_of=None):
    """Per-replica batches of (images, labels, weights): every example once, then weight-0 padding up
    to `steps` full global steps, so no replica ever gets a partial or empty batch (static shapes for
    XLA) and every worker runs the same number of steps; weighted metrics count real examples only.

    With `positions_of` (this Worker), each element also carries its example's position among every
    worker's examples (example i of worker w of n: i x n + w; padding: -1), which puts a prediction
    pass's outputs back in order, whatever replica computed them."""
    spec = examples.dataset.element_spec[0]
    blank = (tf.zeros(spec.shape, spec.dtype), tf.constant(0, tf.int64), 0.0)
    padding = steps * batch_size * local_replicas - examples.count
    dataset = examples.dataset.map(lambda image, label: (image, label, 1.0))
    if positions_of is not None:
        worker, blank = positions_of, (*blank, tf.constant(-1, tf.int64))
        dataset = dataset.enumerate().map(lambda index, element: (*element, index * worker.count + worker.index))
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding))
    return dataset.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE).with_options(options(deterministic))


def decoded(split, *, image_size, max_pixels=MAX_IMAGE_PIXELS):
    """(uint8 image, label) of `split` in order, decoded with a plain `map` (no parallelism, no cache),
    undecodable images skipped: the tutorials' pipeline, and a few examples cheaply."""
    channels = split.source.channels
    return split.source.read(split.name).map(
        lambda image, label: (decode(image, image_size=image_size, channels=channels, max_pixels=max_pixels), label)
    ).ignore_errors()


def naive_dataset(split, *, image_size, batch_size):
    """The tutorials' form, for comparison: decode with a plain `map`, batch, no cache, no prefetch."""
    return decoded(split, image_size=image_size).batch(batch_size)


def images_per_sec(dataset, *, batches, warmup=2):
    """The pipeline's own throughput, no model: images/sec over `batches` batches after `warmup`."""
    iterator = iter(dataset.repeat())
    for _ in range(warmup):
        next(iterator)
    images, started = 0, time.perf_counter()
    for _ in range(batches):
        images += int(tf.shape(next(iterator)[0])[0])
    return images / (time.perf_counter() - started)

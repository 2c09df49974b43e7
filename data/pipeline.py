"""The tf.data input pipeline, distributed with `strategy.distribute_datasets_from_function`.

Per worker: read (sharded by example across workers) -> parallel decode and resize to uint8 at
`image_size` -> cache -> per epoch: seeded shuffle -> per-replica batches -> prefetch. Pixel scaling is
not done here: the model's own `Preprocess` layer does it (models/classifier.py).

Training is one stream for the whole run: epoch e is `shuffle(seed of e)` over the cached examples, cut
to exactly `steps_per_epoch` global steps. Every epoch is a pure function of (seed, epoch), so a run can
start its stream at any epoch and see exactly the batches an uninterrupted run would have.
Evaluation reads each example exactly once, whatever the batch size and replica count.
"""

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE
SHUFFLE_BUFFER = 10_000


def decode(encoded, *, image_size, channels):
    """Encoded image bytes -> uint8 [image_size, image_size, channels]."""
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    image.set_shape([None, None, channels])
    if image.shape[0] != image_size or image.shape[1] != image_size:
        image = tf.image.resize(image, [image_size, image_size])
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image


def _examples(split, input_context, image_size):
    """Decoded, resized, cached (image, label) pairs of this worker's shard."""
    dataset = split.source.read(split.name)
    if input_context and input_context.num_input_pipelines > 1:
        dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    channels = split.source.channels
    dataset = dataset.map(
        lambda image, label: (decode(image, image_size=image_size, channels=channels), label),
        num_parallel_calls=AUTOTUNE,
    )
    return dataset.cache()


def epoch_steps(split, global_batch_size, num_workers=1, cap=None):
    """Full global steps per epoch that every worker's shard can fill (dropping the remainder)."""
    steps = (split.num_examples // num_workers) // (global_batch_size // num_workers)
    return min(steps, cap) if cap else steps


def train_dataset_fn(split, *, image_size, global_batch_size, steps_per_epoch, seed, first_epoch=0):
    """A dataset_fn for `distribute_datasets_from_function`: the training stream from `first_epoch`."""

    def dataset_fn(input_context):
        examples = _examples(split, input_context, image_size)
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
        # Each global step takes one batch per local replica.
        batches_per_epoch = steps_per_epoch * (
            input_context.num_replicas_in_sync // input_context.num_input_pipelines
        )

        def epoch(index):
            return (
                examples.shuffle(SHUFFLE_BUFFER, seed=seed * 1_000_003 + index)
                .batch(batch_size, drop_remainder=True)
                .take(batches_per_epoch)
            )

        stream = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch)
        return stream.prefetch(AUTOTUNE)

    return dataset_fn


def eval_dataset_fn(split, *, image_size, global_batch_size):
    """A dataset_fn for `distribute_datasets_from_function`: every example once, then padding.

    Elements are (image, label, weight). Each worker pads its shard with weight-0 examples up to the
    same number of full global batches, so no replica ever gets a partial or empty batch (static
    shapes for XLA) and metrics weighted by `weight` count each real example exactly once.
    """

    def dataset_fn(input_context):
        workers, worker = input_context.num_input_pipelines, input_context.input_pipeline_id
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
        worker_batch = global_batch_size // workers
        largest_shard = -(-split.num_examples // workers)
        shard = split.num_examples // workers + (worker < split.num_examples % workers)
        padded = -(-largest_shard // worker_batch) * worker_batch
        blank = tf.zeros([image_size, image_size, split.source.channels], tf.uint8)
        padding = tf.data.Dataset.from_tensors((blank, tf.constant(0, tf.int64), 0.0))
        examples = _examples(split, input_context, image_size).map(lambda image, label: (image, label, 1.0))
        examples = examples.concatenate(padding.repeat(padded - shard))
        return examples.batch(batch_size, drop_remainder=True).prefetch(AUTOTUNE)

    return dataset_fn

"""data/: the offline Fashion-MNIST builder, sources and splits, and the tf.data pipeline."""

import gzip
import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from data import fashion_mnist_idx, pipeline, sources
from engine.config import ConfigError
from helpers import one_device, two_devices


@pytest.fixture
def fmnist(tiny):
    return sources.open_source(tiny(label_subset=()))


def test_offline_fashion_mnist_has_tfds_features_and_full_splits(fmnist):
    assert fmnist.builder.name == "fashion_mnist_idx"
    assert fmnist.class_names[:3] == ("T-shirt/top", "Trouser", "Pullover")
    assert fmnist.channels == 1
    assert fmnist.split("train", "train_split").num_examples == 60_000
    assert fmnist.split("test", "test_split").num_examples == 10_000
    assert fmnist.split("train[:80%]", "train_split").num_examples == 48_000


def test_idx_files_are_checked(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(np.array([2049, 5], ">i4").tobytes() + bytes(5))
    with pytest.raises(ValueError, match="not an IDX file of 7 items"):
        fashion_mnist_idx.read_idx(str(bad), 2049, 7)
    assert fashion_mnist_idx.find_files(str(tmp_path)) in (None, fashion_mnist_idx.DEBIAN_DIR)


def _labels(source, split):
    return np.concatenate([labels for _, labels in source.read(split).batch(1000).as_numpy_iterator()])


def test_label_subset_keeps_and_relabels_in_the_order_given(tiny, fmnist):
    subset = sources.open_source(tiny(label_subset=(6, 0, 2)))
    assert subset.class_names == ("Shirt", "T-shirt/top", "Pullover")
    original = _labels(fmnist, "test[:500]")
    relabelled = _labels(subset, "test[:500]")
    expected = np.array([{6: 0, 0: 1, 2: 2}[label] for label in original if label in (6, 0, 2)])
    np.testing.assert_array_equal(relabelled, expected)
    assert subset.split("test[:500]", "test_split").num_examples == len(expected)


def test_a_subset_label_absent_from_a_split_is_refused(tiny, fmnist):
    first = _labels(fmnist, "test[:4]")
    absent = next(label for label in range(10) if label not in first)
    present = int(first[0])
    source = sources.open_source(tiny(label_subset=(present, absent)))
    with pytest.raises(ConfigError, match=rf"label {absent} does not occur in --eval_split=test\[:4\]"):
        source.split("test[:4]", "eval_split")


def test_a_subset_label_beyond_the_classes_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^--label_subset=3,12: fashion_mnist has labels 0..9 only$"):
        sources.open_source(tiny(label_subset=(3, 12)))


@pytest.mark.parametrize("split, message", [("train[:0]", "selects no examples"), ("validation", "not a split")])
def test_empty_or_unknown_splits_are_refused(fmnist, split, message):
    with pytest.raises(ConfigError, match=rf"^--eval_split={split.replace('[', '.').replace(']', '.')}: {message}"):
        fmnist.split(split, "eval_split")


def test_unknown_dataset_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^--dataset=no_such_data: is not a TFDS dataset"):
        sources.open_source(tiny(dataset="no_such_data"))


def _image_digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("strategy_fn", [one_device, two_devices])
@pytest.mark.parametrize("global_batch", [6, 8])
def test_evaluation_sees_every_example_exactly_once(tiny, strategy_fn, global_batch):
    source = sources.open_source(tiny(label_subset=(6, 0, 2)))
    split = source.split("test[:151]", "eval_split")  # 50 examples after the subset: neither batch divides it.
    strategy = strategy_fn()
    dataset = strategy.distribute_datasets_from_function(
        pipeline.eval_dataset_fn(split, image_size=32, global_batch_size=global_batch)
    )
    seen = []
    for images, labels, weights in dataset:
        for replica_images, replica_weights in zip(
            strategy.experimental_local_results(images), strategy.experimental_local_results(weights)
        ):
            assert replica_images.shape[0] == global_batch // strategy.num_replicas_in_sync
            seen += [_image_digest(image) for image, w in zip(replica_images.numpy(), replica_weights) if w == 1]
    expected = [_image_digest(image) for image, _ in pipeline._examples(split, None, 32).as_numpy_iterator()]
    assert split.num_examples == 50
    assert sorted(seen) == sorted(expected), "evaluation lost or duplicated examples"


def test_training_epochs_are_seeded_and_resumable(tiny):
    source = sources.open_source(tiny(label_subset=(6, 0, 2)))
    split = source.split("test[:100]", "train_split")
    steps = pipeline.epoch_steps(split, 8)
    assert steps == split.num_examples // 8

    def batches(first_epoch, count):
        fn = pipeline.train_dataset_fn(
            split, image_size=32, global_batch_size=8, steps_per_epoch=steps, seed=3, first_epoch=first_epoch
        )
        dataset = one_device().distribute_datasets_from_function(fn)
        out = []
        for images, labels in dataset:
            out.append(labels.numpy() if hasattr(labels, "numpy") else labels)
            if len(out) == count:
                return out
        return out

    from_start = batches(0, 2 * steps)
    resumed = batches(1, steps)
    for a, b in zip(from_start[steps:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(from_start[:steps], from_start[steps:])), (
        "two epochs had the same order: the shuffle is not reseeded per epoch"
    )
    assert all(batch.shape == (8,) for batch in from_start)


def test_steps_per_epoch_leave_every_worker_full_batches():
    split = sources.Split(source=None, name="x", num_examples=103)
    assert pipeline.epoch_steps(split, 10) == 10
    assert pipeline.epoch_steps(split, 10, num_workers=2) == 10  # 51 per worker, batches of 5.
    assert pipeline.epoch_steps(split, 10, cap=3) == 3


def test_mock_cats_vs_dogs_decodes_images_of_any_size(tiny):
    with tfds.testing.mock_data(num_examples=12):
        source = sources.open_source(tiny(dataset="cats_vs_dogs", label_subset=(), data_dir=None))
        assert source.class_names == ("cat", "dog") and source.channels == 3
        split = source.split("train", "train_split")
        assert split.num_examples == 12
        images = [image for image, _ in pipeline._examples(split, None, 24).as_numpy_iterator()]
    assert len(images) == 12
    assert {image.shape for image in images} == {(24, 24, 3)}
    assert images[0].dtype == np.uint8


def test_decode_resizes_and_keeps_uint8():
    encoded = tf.io.encode_png(tf.cast(tf.fill([5, 7, 1], 200), tf.uint8))
    image = pipeline.decode(encoded, image_size=9, channels=1)
    assert image.shape == (9, 9, 1) and image.dtype == tf.uint8
    assert int(tf.reduce_min(image)) == int(tf.reduce_max(image)) == 200

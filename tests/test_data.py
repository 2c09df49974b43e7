"""data/: the offline Fashion-MNIST builder, TFDS and folder sources, and the tf.data pipeline."""

import fcntl
import gzip
import json
import hashlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from transfer_engine.data import fashion_mnist_idx, pipeline, sources
from transfer_engine.errors import ConfigError
from helpers import default_strategy, one_device, two_devices


@pytest.fixture
def fmnist(tiny):
    return sources.open_source(tiny(label_subset=()))


@pytest.fixture
def subset(tiny):
    return sources.open_source(tiny(label_subset=(6, 0, 2)))


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


def test_idx_images_are_encoded_as_tfds_encodes_them_and_decode_to_the_same_pixels():
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    encoded = list(fashion_mnist_idx.encode_png(images))
    feature = tfds.features.Image(shape=(28, 28, 1))
    assert encoded == [feature.encode_example(image) for image in images]
    for png, image in zip(encoded, images):
        np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)


def test_the_idx_files_are_found_in_the_manual_dir_first_then_in_debians(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist_idx, "DEBIAN_DIR", str(tmp_path / "debian"))
    names = [name for images, labels, _ in fashion_mnist_idx.FILES.values() for name in (images, labels)]
    for folder in ("manual", "debian"):
        (tmp_path / folder).mkdir()
        for name in names[:-1]:
            (tmp_path / folder / name).write_bytes(b"")
    assert fashion_mnist_idx.find_files(str(tmp_path / "manual")) is None, "three of four files are not enough"
    (tmp_path / "debian" / names[-1]).write_bytes(b"")
    assert fashion_mnist_idx.find_files(str(tmp_path / "manual")) == str(tmp_path / "debian")
    assert fashion_mnist_idx.find_files(None) == str(tmp_path / "debian")
    (tmp_path / "manual" / names[-1]).write_bytes(b"")
    assert fashion_mnist_idx.find_files(str(tmp_path / "manual")) == str(tmp_path / "manual")


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_the_shipped_sample_is_the_whole_sets_splits_it_names(tiny, tmp_path):
    """data/fashion_mnist_sample holds what write_sample makes from the whole set (byte for byte), and
    read through TFDS each of its splits gives the examples of the whole set's split, in its order."""
    whole = sources.open_source(tiny(label_subset=fashion_mnist_idx.SAMPLE_LABELS))
    fashion_mnist_idx.write_sample(whole.builder, str(tmp_path))
    for split in fashion_mnist_idx.SAMPLE:
        for path in fashion_mnist_idx.sample_paths(split):
            with open(path, "rb") as shipped, open(tmp_path / os.path.basename(path), "rb") as made:
                assert shipped.read() == made.read(), f"{path} is not what write_sample makes"
    sample = sources.open_source(tiny(dataset="fashion_mnist_sample", label_subset=fashion_mnist_idx.SAMPLE_LABELS))
    for split, selection in fashion_mnist_idx.SAMPLE.items():
        ours, theirs = (list(source.read(name).as_numpy_iterator()) for source, name in ((sample, split), (whole, selection)))
        assert len(ours) == len(theirs) == sample.split(split, "train_split").num_examples
        assert all(a[0] == b[0] and a[1] == b[1] for a, b in zip(ours, theirs)), f"{split} differs from {selection}"


def _labels(source, split):
    return np.concatenate([labels for _, labels in source.read(split).batch(1000).as_numpy_iterator()])


def test_label_subset_keeps_and_relabels_in_the_order_given(fmnist, subset):
    assert subset.class_names == ("Shirt", "T-shirt/top", "Pullover")
    original = _labels(fmnist, "test[:500]")
    relabelled = _labels(subset, "test[:500]")
    expected = np.array([{6: 0, 0: 1, 2: 2}[label] for label in original if label in (6, 0, 2)])
    np.testing.assert_array_equal(relabelled, expected)
    assert subset.split("test[:500]", "test_split").num_examples == len(expected)


def test_a_subset_label_absent_from_a_split_is_refused(tiny, fmnist):
    first = _labels(fmnist, "test[:4]")
    absent = next(label for label in range(10) if label not in first)
    source = sources.open_source(tiny(label_subset=(int(first[0]), absent)))
    with pytest.raises(ConfigError, match=rf"label {absent} does not occur in --eval_split=test\[:4\]"):
        source.split("test[:4]", "eval_split")


def test_a_subset_label_beyond_the_classes_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^--label_subset=3,12: fashion_mnist has labels 0..9 only$"):
        sources.open_source(tiny(label_subset=(3, 12)))


@pytest.mark.parametrize("split, message", [("train[:0]", "selects no examples"), ("validation", "not a split")])
def test_empty_or_unknown_splits_are_refused(fmnist, subset, split, message):
    for source in (fmnist, subset):
        with pytest.raises(ConfigError, match=rf"^--eval_split={split.replace('[', '.').replace(']', '.')}: {message}"):
            source.split(split, "eval_split")


def test_unknown_dataset_is_refused(tiny):
    with pytest.raises(ConfigError, match=r"^--dataset=no_such_data: is not a TFDS dataset"):
        sources.open_source(tiny(dataset="no_such_data"))


def _digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.mark.parametrize("strategy_fn", [default_strategy, one_device, two_devices])
@pytest.mark.parametrize("global_batch", [6, 8])
def test_evaluation_sees_every_example_exactly_once(subset, strategy_fn, global_batch):
    split = subset.split("test[:151]", "eval_split")  # 50 examples after the subset: neither batch divides it.
    examples = pipeline.prepare(split, image_size=32)
    strategy = strategy_fn()
    replicas = strategy.num_replicas_in_sync
    steps = pipeline.eval_steps(split, global_batch)
    dataset = strategy.distribute_datasets_from_function(
        lambda context: pipeline.eval_dataset(
            examples, batch_size=context.get_per_replica_batch_size(global_batch), steps=steps,
            local_replicas=replicas,
        )
    )
    seen, batches = [], 0
    for images, labels, weights in dataset:
        batches += 1
        for replica_images, replica_weights in zip(
            strategy.experimental_local_results(images), strategy.experimental_local_results(weights)
        ):
            assert replica_images.shape[0] == global_batch // replicas
            seen += [_digest(image) for image, w in zip(replica_images.numpy(), replica_weights) if w == 1]
    expected = [_digest(image) for image, _ in examples.dataset.as_numpy_iterator()]
    assert split.num_examples == examples.count == 50 and batches == steps == -(-50 // global_batch)
    assert sorted(seen) == sorted(expected), "evaluation lost or duplicated examples"


def _epochs(examples, *, count, first_epoch=0, augmentation=pipeline.Augmentation(),
            shuffle_buffer=pipeline.SHUFFLE_BUFFER):
    steps = pipeline.epoch_steps(examples, 8)
    dataset = pipeline.train_dataset(
        examples, batch_size=8, batches_per_epoch=steps, seed=3, epochs=first_epoch + count,
        first_epoch=first_epoch,
        augmentation=augmentation, shuffle_buffer=shuffle_buffer,
    )
    batches = list(dataset.take(steps * count).as_numpy_iterator())
    return [batches[i * steps:(i + 1) * steps] for i in range(count)]


def test_training_epochs_are_seeded_full_and_resumable(subset):
    examples = pipeline.prepare(subset.split("test[:100]", "train_split"), image_size=32)
    assert pipeline.epoch_steps(examples, 8) == examples.count // 8
    first, second = _epochs(examples, count=2)
    (resumed,) = _epochs(examples, count=1, first_epoch=1)
    for a, b in zip(second, resumed):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, second)), "epochs were not reshuffled"
    seen = [_digest(image) for images, _ in first for image in images]
    assert len(set(seen)) == len(seen) == pipeline.epoch_steps(examples, 8) * 8, "an epoch repeated examples"


def test_training_order_depends_on_the_seed_alone(subset):
    # --seed=0 makes the process's global seed 0: TensorFlow's (0, 0) seed check once failed on the
    # epoch's tensor seed there. The order must not depend on the global seed at all.
    examples = pipeline.prepare(subset.split("test[:100]", "train_split"), image_size=32)
    orders = []
    for global_seed in (0, 123):
        tf.random.set_seed(global_seed)
        orders.append([labels for epoch in _epochs(examples, count=2) for _, labels in epoch])
    for a, b in zip(*orders):
        np.testing.assert_array_equal(a, b)


def test_augmentation_runs_after_the_cache(subset):
    """One decode per example, yet two epochs see different augmented pixels of the same images."""
    decoded = tf.Variable(0, dtype=tf.int64)
    original = pipeline.decode

    def counting_decode(*args, **kwargs):
        decoded.assign_add(1)
        return original(*args, **kwargs)

    pipeline.decode = counting_decode
    try:
        examples = pipeline.prepare(subset.split("test[:60]", "train_split"), image_size=32)
    finally:
        pipeline.decode = original
    assert int(decoded.numpy()) == examples.count
    # A buffer of 1 keeps the cache order, so epoch 1's images are epoch 0's, augmented anew.
    first, second = _epochs(examples, count=2, augmentation=pipeline.Augmentation("flip_crop"), shuffle_buffer=1)
    assert int(decoded.numpy()) == examples.count, "training decoded again: augmentation is not after the cache"
    cached = np.stack([image for image, _ in examples.dataset.as_numpy_iterator()])[: len(first) * 8]
    augmented = [np.concatenate([images for images, _ in epoch]) for epoch in (first, second)]
    assert not np.array_equal(augmented[0], augmented[1]), "both epochs got the same augmentation"
    assert not np.array_equal(augmented[0], cached)
    again, _ = _epochs(examples, count=2, augmentation=pipeline.Augmentation("flip_crop"), shuffle_buffer=1)
    np.testing.assert_array_equal(np.concatenate([images for images, _ in again]), augmented[0])


def test_augment_flips_and_crops_within_the_padded_image():
    image = tf.reshape(tf.range(64 * 3, dtype=tf.int32) % 256, [8, 8, 3])
    image = tf.cast(image, tf.uint8)
    outputs = {_digest(pipeline.Augmentation("flip").example(image, tf.constant([1, i], tf.int64)).numpy()) for i in range(20)}
    assert outputs == {_digest(image.numpy()), _digest(image.numpy()[:, ::-1])}
    cropped = [pipeline.Augmentation("flip_crop").example(image, tf.constant([2, i], tf.int64)) for i in range(20)]
    assert all(c.shape == (8, 8, 3) for c in cropped)
    assert len({_digest(c.numpy()) for c in cropped}) > 2


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_randaugment_and_mixing_are_pure_functions_of_the_seed_and_epoch(subset):
    """RandAugment changes the pixels; MixUp and CutMix mix each batch with soft labels that sum to 1 and
    keep the unmixed labels in the stream's order; a resumed epoch sees exactly the same batches."""
    examples = pipeline.prepare(subset.split("test[:48]", "train_split"), image_size=32)
    (plain,) = _epochs(examples, count=1, first_epoch=1, shuffle_buffer=1)
    (flipped,) = _epochs(examples, count=1, first_epoch=1, augmentation=pipeline.Augmentation("flip"), shuffle_buffer=1)
    for augmentation in (pipeline.Augmentation("randaugment"), pipeline.Augmentation(mixup=0.4, num_classes=3),
                         pipeline.Augmentation(cutmix=1.0, num_classes=3),
                         pipeline.Augmentation("flip", mixup=0.4, cutmix=1.0, num_classes=3)):
        first, second = _epochs(examples, count=2, augmentation=augmentation, shuffle_buffer=1)
        (resumed,) = _epochs(examples, count=1, first_epoch=1, augmentation=augmentation, shuffle_buffer=1)
        for a, b in zip(second, resumed):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
        images = np.concatenate([batch[0] for batch in second])
        assert images.dtype == np.uint8 and not np.array_equal(images, np.concatenate([b[0] for b in plain]))
        np.testing.assert_array_equal(np.concatenate([b[1] for b in second]), np.concatenate([b[1] for b in plain]))
        if augmentation.mixers:
            soft = np.concatenate([batch[2] for batch in second])
            np.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-6)
            # Mixed with a real share of another class (pairs of one class stay one-hot), not a sliver of it.
            assert np.mean(soft.max(axis=1) < 0.95) > 0.2, soft
        else:  # RandAugment: more than the flip it starts with.
            assert len(second[0]) == 2
            assert not np.array_equal(images, np.concatenate([b[0] for b in flipped]))
        assert not np.array_equal(images, np.concatenate([batch[0] for batch in first]))


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_augmentation_computes_in_float32_under_a_mixed_precision_policy(subset):
    """What --precision=mixed_float16 (auto's choice on GPUs) sets globally must not reach the input
    pipeline: MixUp and CutMix failed there ('y' of Mul float16 against float32), RandAugment would round."""
    examples = pipeline.prepare(subset.split("test[:48]", "train_split"), image_size=32)
    kinds = [dict(mode="randaugment"), dict(mixup=0.4, num_classes=3), dict(cutmix=1.0, num_classes=3),
             dict(mode="flip", mixup=0.4, cutmix=1.0, num_classes=3)]
    expected = [_epochs(examples, count=1, augmentation=pipeline.Augmentation(**kind), shuffle_buffer=1) for kind in kinds]
    keras.mixed_precision.set_global_policy("mixed_float16")  # The autouse fixture restores float32.
    for kind, (batches,) in zip(kinds, expected):
        (mixed_policy,) = _epochs(examples, count=1, augmentation=pipeline.Augmentation(**kind), shuffle_buffer=1)
        for a, b in zip(batches, mixed_policy):
            for x, y in zip(a, b):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(x, y, err_msg=str(kind))


def test_file_cache_is_written_once_and_reused(subset, tmp_path):
    split = subset.split("test[:60]", "train_split")
    first = pipeline.prepare(split, image_size=16, cache=str(tmp_path))
    files = sorted(os.listdir(tmp_path))
    assert files and any(name.endswith(".index") for name in files)
    second = pipeline.prepare(split, image_size=16, cache=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == files and first.count == second.count == split.num_examples
    a = [image for image, _ in first.dataset.as_numpy_iterator()]
    b = [image for image, _ in second.dataset.as_numpy_iterator()]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_workers_shard_by_example_and_see_every_example_once(subset):
    split = subset.split("test[:100]", "train_split")
    shards = [pipeline.prepare(split, image_size=16, worker=pipeline.Worker(i, 3)) for i in range(3)]
    assert [shard.count for shard in shards] == [pipeline.Worker(i, 3).shard_size(split.num_examples) for i in range(3)]
    digests = [_digest(image) for shard in shards for image, _ in shard.dataset.as_numpy_iterator()]
    whole = [_digest(image) for image, _ in pipeline.prepare(split, image_size=16).dataset.as_numpy_iterator()]
    assert sorted(digests) == sorted(whole)


def test_steps_cover_the_largest_worker_shard():
    split = sources.Split(source=None, name="x", num_examples=103)
    assert pipeline.eval_steps(split, 10) == 11
    assert pipeline.eval_steps(split, 10, pipeline.Worker(1, 2)) == 11  # 52 per worker, batches of 5.
    counted = pipeline.Examples(split=split, dataset=None, count=103, skipped=0)
    assert pipeline.epoch_steps(counted, 10) == 10
    assert pipeline.epoch_steps(counted, 10, cap=3) == 3


def _write_folder(root, per_class=6, corrupt=None):
    """A folder dataset of small PNG and JPEG images; `corrupt` names a class to add a broken JPEG to."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):
        os.makedirs(root / name)
        for i in range(per_class):
            pixels = tf.constant(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8))
            encoded = tf.io.encode_jpeg(pixels) if i % 2 else tf.io.encode_png(pixels)
            (root / name / f"{i}.{'jpg' if i % 2 else 'png'}").write_bytes(encoded.numpy())
        (root / name / "notes.txt").write_text("not an image")
    if corrupt:
        (root / corrupt / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")


def test_a_folder_dataset_has_classes_splits_and_skips_a_corrupt_image(tiny, tmp_path):
    _write_folder(tmp_path, corrupt="dog")
    source = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=()))
    assert source.class_names == ("cat", "dog") and source.channels == 3
    whole = source.split("train", "train_split")
    assert whole.num_examples == 13
    assert source.split("train[:50%]", "train_split").num_examples + source.split(
        "train[50%:]", "eval_split").num_examples == 13
    examples = pipeline.prepare(whole, image_size=24)
    assert (examples.count, examples.skipped, examples.class_counts) == (12, 1, (6, 6))
    assert examples.undecodable == (str(tmp_path / "dog" / "broken.jpg"),)
    swapped = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=(1, 0)))
    assert pipeline.prepare(swapped.split("train", "train_split"), image_size=24).undecodable == (
        str(tmp_path / "dog" / "broken.jpg"),
    )
    with pytest.raises(ConfigError, match=r"not a split of folder:.*Unknown split 'test'"):
        source.split("test", "test_split")
    only_dogs = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=(1, 0)))
    assert only_dogs.class_names == ("dog", "cat")


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_a_folder_without_split_flags_trains_evaluates_and_tests_on_an_80_10_10_cut(tiny, tmp_path, caplog):
    from transfer_engine.engine.core.run_dir import read_flagfile
    from helpers import digest_tree, launch_in_process, tiny_flags

    _write_folder(tmp_path / "images", per_class=20)
    run = tmp_path / "run"
    config = tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=(), model_dir=str(run), batch_size=4,
                  train_split=None, eval_split=None, test_split=None)
    with caplog.at_level("INFO"):
        status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0, stderr
    assert caplog.text.count("Splits: folder:") == 1 and (
        "has one split, train: --train_split=train[:80%], --eval_split=train[80%:90%], --test_split=train[90%:]"
    ) in caplog.text
    saved = read_flagfile(str(run / "flags.txt"))
    assert (saved["train_split"], saved["eval_split"], saved["test_split"]) == sources.ONLY_TRAIN
    for line in ("train: train[:80%], 32 examples", "eval: train[80%:90%], 4 examples", "test: train[90%:], 4 examples"):
        assert line in caplog.text
    with open(run / "results.json") as f:
        results = json.load(f)
    assert (results["global_step"], results["test_examples"]) == (32 // 4, 4)
    caplog.clear()
    with caplog.at_level("INFO"):  # Rerun: the split flags now come from the run's own flags.txt.
        assert launch_in_process(f"--flagfile={run / 'flags.txt'}")[0] == 0
    assert "Splits:" not in caplog.text and "Complete" in caplog.text

    # The folder gains an image: continuing would draw train, eval and test anew. Refused, nothing touched.
    added = tmp_path / "images" / "cat" / "added.png"
    added.write_bytes(tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy())
    before = digest_tree(str(run))
    status, stderr = launch_in_process(f"--flagfile={run / 'flags.txt'}", "--epochs=2")
    assert status == 2 and f"error: --dataset=folder:{tmp_path / 'images'}: changed since the run in {run} began on " \
        "it (40 images then, 41 now, or their names, sizes or times differ): continuing would mix the splits; " \
        "restore it, or train in another --model_dir" in stderr, stderr
    assert digest_tree(str(run)) == before
    caplog.clear()
    with caplog.at_level("WARNING"):  # Evaluating it is allowed, and warned about.
        assert launch_in_process(f"--flagfile={run / 'flags.txt'}", "--job=evaluate")[0] == 0
    assert "began on it (40 images then, 41 now, or their names, sizes or times differ): eval and test now hold " \
        "other images than the run's" in caplog.text
    added.unlink()
    # As many images, one renamed: changed all the same (a count alone would miss renames and rewrites).
    first = sorted((tmp_path / "images" / "cat").iterdir())[0]
    renamed = first.with_name("renamed" + first.suffix)
    first.rename(renamed)
    status, stderr = launch_in_process(f"--flagfile={run / 'flags.txt'}", "--epochs=2")
    assert status == 2 and "(40 images then, 40 now, or their names, sizes or times differ)" in stderr, stderr
    renamed.rename(first)
    assert launch_in_process(f"--flagfile={run / 'flags.txt'}", "--epochs=2")[0] == 0


class _Splits:
    def __init__(self, *names):
        self.split_names, self.name = names, "a dataset"


@pytest.mark.parametrize("names, expected", [
    (("train", "test"), ("train[:90%]", "train[90%:]", "test")),
    (("test", "train"), ("train[:90%]", "train[90%:]", "test")),
    (("train", "validation", "test"), ("train", "validation", "test")),
    (("train", "validation"), ("train", "validation", "")),
    (("train",), sources.ONLY_TRAIN),
    ((), ("train[:90%]", "train[90%:]", "test")),  # Metadata that does not say (TFDS' mock).
])
def test_split_flags_not_given_follow_the_splits_the_dataset_has(tiny, names, expected):
    config = tiny(train_split=None, eval_split=None, test_split=None)
    resolved = sources.with_default_splits(config, _Splits(*names))
    assert (resolved.train_split, resolved.eval_split, resolved.test_split) == expected
    given = tiny(train_split="train[:5]", eval_split=None, test_split="")
    resolved = sources.with_default_splits(given, _Splits(*names))
    assert (resolved.train_split, resolved.eval_split, resolved.test_split) == ("train[:5]", expected[1], "")


def test_images_in_folders_inside_a_class_folder_belong_to_it_and_other_files_are_named(tiny, tmp_path, caplog):
    _write_folder(tmp_path, per_class=2)
    for year in ("2019", "2020/late"):
        os.makedirs(tmp_path / "cat" / year)
        pixels = tf.constant(np.full((9, 9, 3), 7, np.uint8))
        (tmp_path / "cat" / year / "more.png").write_bytes(tf.io.encode_png(pixels).numpy())
    (tmp_path / "cat" / "2019" / "Thumbs.db").write_bytes(b"")
    with caplog.at_level("INFO"):
        source = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=()))
    assert source.split("train", "train_split").num_examples == 6
    assert sorted(_labels(source, "train")) == [0, 0, 0, 0, 1, 1]
    assert sorted(str(source.paths[i]) for i in np.flatnonzero(source.labels == 0))[:2] == [
        str(tmp_path / "cat" / "0.png"), str(tmp_path / "cat" / "1.jpg")
    ]
    assert "3 files are not images (.jpg, .jpeg, .png, .bmp, .gif) and are left out: cat/notes.txt, " \
        "cat/2019/Thumbs.db, dog/notes.txt" in caplog.text


def test_hidden_folders_and_files_are_neither_classes_nor_examples(tiny, tmp_path, caplog):
    _write_folder(tmp_path, per_class=2)
    png = tf.io.encode_png(tf.constant(np.full((9, 9, 3), 7, np.uint8))).numpy()
    for hidden in (".ipynb_checkpoints/0-checkpoint.png", "cat/.ipynb_checkpoints/1-checkpoint.png",
                   "dog/.thumbnails/2019/0.png", "dog/._0.png", "cat/.DS_Store", ".DS_Store"):
        os.makedirs((tmp_path / hidden).parent, exist_ok=True)
        (tmp_path / hidden).write_bytes(png)
    with caplog.at_level("INFO"):
        source = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=()))
    assert source.class_names == ("cat", "dog")
    assert sorted(os.path.relpath(path, tmp_path) for path in source.paths) == [
        "cat/0.png", "cat/1.jpg", "dog/0.png", "dog/1.jpg"
    ]
    assert "2 files are not images (.jpg, .jpeg, .png, .bmp, .gif) and are left out: cat/notes.txt, " \
        "dog/notes.txt" in caplog.text


def _write_classes(root, sizes):
    """A folder dataset of empty files (splits never decode them): `sizes[k]` of them in folder classk."""
    for label, size in enumerate(sizes):
        os.makedirs(root / f"class{label}")
        for i in range(size):
            (root / f"class{label}" / f"{label}_{i}.png").write_bytes(b"")


def _names(source, split):
    return [source.example_name(split, i) for i in range(source.split(split, "train_split").num_examples)]


@pytest.mark.parametrize("sizes, expected", [
    ((40, 40, 40), [(32, 32, 32), (4, 4, 4), (4, 4, 4)]),
    ((10, 30, 50), [(8, 24, 40), (1, 3, 5), (1, 3, 5)]),
])
def test_percent_splits_of_a_folder_take_each_classs_share_and_partition_it(tiny, tmp_path, sizes, expected):
    _write_classes(tmp_path, sizes)
    source = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=()))
    assert [source.class_counts(split) for split in sources.ONLY_TRAIN] == expected
    splits = [_names(source, split) for split in sources.ONLY_TRAIN]
    assert sorted(name for names in splits for name in names) == sorted(source.paths), "not a partition"
    position = {str(path): i for i, path in enumerate(source.paths)}
    for names in splits:  # Each keeps the shuffled order, classes mixed.
        assert [position[name] for name in names] == sorted(position[name] for name in names)
    assert len(set(_labels(source, "train[:80%]")[:10])) > 1
    np.testing.assert_array_equal(np.bincount(_labels(source, "train[90%:]")), expected[2])
    # Absolute slices count in the whole shuffled order; a sum handles each part by its own unit.
    assert _names(source, "train[:10]") == list(source.paths[:10])
    assert _names(source, "train[-5:]") == list(source.paths[-5:])
    assert _names(source, "train[:10%]+train[-3:]") == _names(source, "train[:10%]") + list(source.paths[-3:])
    subset = sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=(2, 0)))
    assert subset.class_counts("train[80%:90%]") == (expected[1][2], expected[1][0])
    assert _names(subset, "train[80%:90%]") == [name for name in splits[1] if "/class1/" not in name]


def test_a_folders_file_cache_is_not_the_one_an_unstratified_selection_wrote(tiny, tmp_path, monkeypatch):
    _write_folder(tmp_path / "images", per_class=10)
    cache = tmp_path / "cache"
    source = sources.open_source(tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=()))
    split = source.split("train[:50%]", "train_split")
    with monkeypatch.context() as old:  # What the unstratified selection's files were named.
        old.setattr(sources.FolderSource, "split_scheme", "")
        pipeline.prepare(split, image_size=16, cache=str(cache))
    written = set(os.listdir(cache))
    assert pipeline.prepare(split, image_size=16, cache=str(cache)).count == split.num_examples
    assert set(os.listdir(cache)) > written, "the cache of the old selection was read"


def test_an_empty_class_folder_is_refused(tiny, tmp_path):
    _write_folder(tmp_path)
    os.makedirs(tmp_path / "bird")
    (tmp_path / "bird" / "readme.txt").write_text("no images yet")
    with pytest.raises(ConfigError, match=r"^--dataset=folder:.*: class folder bird has no image \(\.jpg, "):
        sources.open_source(tiny(dataset=f"folder:{tmp_path}", label_subset=()))


def test_a_class_whose_images_all_fail_to_decode_is_one_line(tiny, tmp_path):
    from helpers import launch_in_process, tiny_flags

    _write_folder(tmp_path / "images")
    for image in (tmp_path / "images" / "dog").iterdir():
        image.write_bytes(b"not an image")
    config = tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=(), train_split="train", eval_split="",
                  test_split="", model_dir=str(tmp_path / "run"), batch_size=2)
    status, stderr = launch_in_process(*tiny_flags(config))
    assert (status, stderr) == (2, "error: --train_split=train: has no image of class dog that decodes\n")


def test_a_folder_without_class_folders_is_refused(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"^--dataset=folder:.*needs one sub-folder of images per class"):
        sources.open_source(tiny(dataset=f"folder:{tmp_path}"))
    with pytest.raises(ConfigError, match=r"^--dataset=folder:/no/such/dir: no such directory$"):
        sources.open_source(tiny(dataset="folder:/no/such/dir"))
    _write_folder(tmp_path / "images")  # One class's folder given: its images are named, with what to give.
    with pytest.raises(ConfigError) as one_class:
        sources.open_source(tiny(dataset=f"folder:{tmp_path / 'images' / 'cat'}"))
    assert str(one_class.value).endswith("needs one sub-folder of images per class (0 sub-folders, 0 images in them; "
                                         "6 images beside them: if it is one class's folder, give the folder that "
                                         "holds the class folders)")


def test_mock_cats_vs_dogs_decodes_images_of_any_size(tiny, monkeypatch):
    monkeypatch.setattr(sources, "_unreachable", lambda urls: None)  # The mock stands in for the download.
    with tfds.testing.mock_data(num_examples=12):
        source = sources.open_source(tiny(dataset="cats_vs_dogs", label_subset=(), data_dir=None))
        assert source.class_names == ("cat", "dog") and source.channels == 3
        split = source.split("train", "train_split")
        examples = pipeline.prepare(split, image_size=24)
        images = [image for image, _ in examples.dataset.as_numpy_iterator()]
    assert split.num_examples == examples.count == len(images) == 12
    assert {image.shape for image in images} == {(24, 24, 3)} and images[0].dtype == np.uint8


def test_decode_resizes_and_keeps_uint8():
    encoded = tf.io.encode_png(tf.cast(tf.fill([5, 7, 1], 200), tf.uint8))
    image = pipeline.decode(encoded, image_size=9, channels=1)
    assert image.shape == (9, 9, 1) and image.dtype == tf.uint8
    assert int(tf.reduce_min(image)) == int(tf.reduce_max(image)) == 200


@pytest.mark.parametrize("form, mode", [
    ("PNG", "L"), ("PNG", "LA"), ("PNG", "RGB"), ("PNG", "RGBA"), ("JPEG", "L"), ("JPEG", "RGB"),
    ("BMP", "RGB"), ("GIF", "L"),
])
def test_decode_takes_every_format_and_channel_count_to_the_models_channels(form, mode):
    """BMP and GIF cannot convert channels while decoding: gray and RGB models both take every file."""
    import io

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, len(mode)), dtype=np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels[..., 0] if len(mode) == 1 else pixels, mode).save(encoded, form)
    original = tf.io.decode_image(encoded.getvalue(), expand_animations=False).numpy()
    color = original[..., :3] if original.shape[-1] >= 3 else original[..., :1]  # Alpha dropped.
    for channels in (1, 3):
        image = pipeline.decode(encoded.getvalue(), image_size=6, channels=channels).numpy()
        assert image.shape == (6, 6, channels) and image.dtype == np.uint8
        if channels == color.shape[-1]:
            np.testing.assert_array_equal(image, color)
        elif channels == 3:  # Gray repeated.
            np.testing.assert_array_equal(image, np.repeat(color, 3, axis=-1))
        else:
            np.testing.assert_array_equal(image, tf.image.rgb_to_grayscale(color).numpy())


def test_the_pipeline_throughput_helper_counts_the_images_of_the_timed_batches(subset, monkeypatch):
    """A clock that advances one second per reading: the rate is then the images timed, exactly."""
    import itertools
    import types

    split = subset.split("test[:64]", "train_split")
    clock = itertools.count()
    monkeypatch.setattr(pipeline, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    naive = pipeline.naive_dataset(split, image_size=16, batch_size=8)
    sizes = [8] * (split.num_examples // 8) + [split.num_examples % 8]  # One pass; the helper repeats it.
    assert 0 < sizes[-1] < 8 and len(sizes) >= 3
    repeated = sizes * 3
    assert pipeline.images_per_sec(naive, batches=3, warmup=2) == sum(repeated[2:5])
    assert pipeline.images_per_sec(naive, batches=len(sizes), warmup=0) == split.num_examples


@pytest.mark.slow
def test_an_image_above_the_pixel_limit_is_skipped_unread_and_named(tiny, tmp_path, caplog):
    """A 1.2 MB PNG of 20000x20000 pixels took 7.6 GB to decode: the header's size is checked first."""
    import io

    from PIL import Image

    from transfer_engine.data import pipeline

    for size, fmt in ((300, "PNG"), (301, "JPEG"), (302, "GIF"), (303, "BMP")):
        encoded = io.BytesIO()
        Image.new("RGB", (size, 200)).save(encoded, fmt)
        assert int(pipeline.header_pixels(tf.constant(encoded.getvalue()))) == size * 200, fmt
    folder = tmp_path / "images"
    _write_folder(folder, per_class=4)
    Image.new("L", (20000, 20000)).save(folder / "cat" / "bomb.png")  # 388 kB; 400 million pixels.
    source = sources.open_source(tiny(dataset=f"folder:{folder}", label_subset=()))
    split = source.split("train", "train_split")
    prepared = pipeline.prepare(split, image_size=16, max_pixels=10_000)
    assert prepared.count == 8 and prepared.undecodable == (str(folder / "cat" / "bomb.png"),)
    assert pipeline.prepare(split, image_size=16, max_pixels=20_000 * 20_000).count == 9


@pytest.mark.slow
def test_names_that_are_not_utf8_are_read_trained_on_and_predicted_like_any_other(tiny, tmp_path):
    """Disks written by other systems hold such names: training and predict ended in a traceback."""
    from helpers import launch_in_process, tiny_flags

    root = os.fsencode(tmp_path / "images")
    rng = np.random.default_rng(1)
    for folder in (b"caf\xe9", b"dog"):
        os.makedirs(os.path.join(root, folder))
        for i in range(10):
            name = os.path.join(root, folder, b"\xff%d.png" % i if i % 2 else b"%d.png" % i)
            with open(name, "wb") as f:
                f.write(tf.io.encode_png(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).numpy())
    run = tmp_path / "run"
    config = tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=(), model_dir=str(run), batch_size=2,
                  train_split=None, eval_split=None, test_split=None)
    status, stderr = launch_in_process(*tiny_flags(config))
    assert status == 0, stderr
    with open(run / "results.json") as f:
        assert json.load(f)["class_names"] == ["caf\udce9", "dog"]
    status, stderr = launch_in_process("--job=predict", f"--model_dir={run}", f"--inputs={tmp_path / 'images'}")
    assert status == 0, stderr
    with open(run / "predictions.csv", "rb") as f:
        rows = f.read().splitlines()[1:]
    assert sorted(row.split(b",")[0] for row in rows) == sorted(
        os.path.join(root, folder, name) for folder in (b"caf\xe9", b"dog") for name in os.listdir(os.path.join(root, folder)))


def test_a_folders_examples_are_in_a_fixed_shuffled_order_not_by_class(tiny, tmp_path):
    """An absolute slice (train[:10]) takes examples of every class, the same ones every run."""
    _write_folder(tmp_path / "images", per_class=20)
    opened = lambda: sources.open_source(tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=()))
    source = opened()
    for split in ("train[:10]", "train[-10:]"):
        assert all(count > 0 for count in source.class_counts(split)), (split, source.class_counts(split))
    assert [source.example_name("train[:10]", k) for k in range(10)] == [
        opened().example_name("train[:10]", k) for k in range(10)]


def _numbers(count):
    return tf.data.Dataset.range(count).map(lambda n: (tf.fill([4, 4, 1], tf.cast(n, tf.uint8)), n))


def test_two_runs_writing_one_file_cache_at_once_both_read_every_example(tmp_path):
    """Two writers of one --cache name at the same time (runs sharing a cache on a shared box): each gets
    every example, one set of files is published, and no writer's files are left. TensorFlow's own file
    cache refuses the second writer (AlreadyExistsError on its lockfile)."""
    first, second = (pipeline.FileCache(str(tmp_path), "split") for _ in range(2))
    writing = iter(first.cache(_numbers(50)))
    assert next(writing)[1] == 0  # The first writer is half-way when the second starts.
    assert [int(n) for _, n in second.cache(_numbers(50)).as_numpy_iterator()] == list(range(50))
    assert [int(n) for _, n in second.published(_numbers(50)).as_numpy_iterator()] == list(range(50))
    assert [int(n) for _, n in writing] == list(range(1, 50))
    assert [int(n) for _, n in first.published(_numbers(50)).as_numpy_iterator()] == list(range(50))
    assert sorted(os.listdir(tmp_path)) == [".publishing.lock", "split.data-00000-of-00001", "split.index"]
    # Published: read from the files, not computed again (the source would give other numbers now).
    assert [int(n) for _, n in pipeline.FileCache(str(tmp_path), "split").cache(_numbers(7)).as_numpy_iterator()] == list(range(50))


WRITE_AND_WAIT = """
import sys, time
import tensorflow as tf
from transfer_engine.data import pipeline
numbers = tf.data.Dataset.range(50).map(lambda n: (tf.fill([4, 4, 1], tf.cast(n, tf.uint8)), n))
writing = iter(pipeline.FileCache(sys.argv[1], "split").cache(numbers))
next(writing)
print("writing", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # A process of its own, to kill.
def test_a_killed_cache_writers_files_are_removed_and_stop_no_one(tmp_path):
    """A run killed (-9) while it wrote the cache leaves TensorFlow's lockfile and temporary state: the next
    run removes them and caches everything; a live writer of another split keeps its files."""
    writer = subprocess.Popen([sys.executable, "-c", WRITE_AND_WAIT, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline() == "writing\n"
    writer.kill()
    writer.wait()
    leftovers = set(os.listdir(tmp_path))
    assert any(name.endswith("lockfile") for name in leftovers), leftovers
    alive = pipeline.FileCache(str(tmp_path), "other").cache(_numbers(3))  # Another split's writer, alive.
    next(iter(alive))
    again = pipeline.FileCache(str(tmp_path), "split")
    assert [int(n) for _, n in again.cache(_numbers(50)).as_numpy_iterator()] == list(range(50))
    again.published(_numbers(50))
    names = set(os.listdir(tmp_path))
    assert not names & leftovers, "the killed writer's files were left"
    assert {"split.index", "split.data-00000-of-00001"} <= names
    assert any(name.startswith("other.writing-") for name in names), "a live writer's files were removed"


def test_a_changed_folder_gets_a_new_file_cache_and_the_same_folder_reuses_it(tiny, tmp_path):
    """A cache written before images were added (or rewritten) is never read for the changed folder: its
    name holds a hash of the folder's names, sizes and times."""
    _write_folder(tmp_path / "images", per_class=10)
    cache = tmp_path / "cache"

    def prepared():
        source = sources.open_source(tiny(dataset=f"folder:{tmp_path / 'images'}", label_subset=()))
        return pipeline.prepare(source.split("train", "train_split"), image_size=16, cache=str(cache))

    assert prepared().count == 20
    written = set(os.listdir(cache))
    assert prepared().count == 20 and set(os.listdir(cache)) == written
    pixels = tf.io.encode_png(tf.zeros([8, 8, 3], tf.uint8)).numpy()
    (tmp_path / "images" / "cat" / "new.png").write_bytes(pixels)
    again = prepared()
    assert (again.count, again.skipped) == (21, 0)
    assert len(set(os.listdir(cache)) - written) == 2  # A new index and data file.
    (tmp_path / "images" / "cat" / "new.png").write_bytes(pixels + b"\0")  # Rewritten: another size.
    assert prepared().count == 21 and len(set(os.listdir(cache)) - written) == 4


@pytest.mark.slow  # A run in a process of its own, waiting.
def test_a_first_run_waits_for_another_preparing_the_dataset_and_reads_what_it_prepared(tmp_path):
    """Two first runs at once on a fresh machine: while another holds the preparation's lock, a run waits,
    then reads what the other prepared (its splits too) instead of preparing it again and failing."""
    from transfer_engine.engine.core.run_dir import read_flagfile
    from helpers import ROOT, tiny_config, tiny_flags

    data_dir = tmp_path / "tfds"
    lock = data_dir / "fashion_mnist_sample" / ".1.0.0.preparing"
    lock.parent.mkdir(parents=True)
    config = tiny_config(data_dir=str(data_dir), model_dir=str(tmp_path / "run"), dataset="fashion_mnist_sample",
                         label_subset=fashion_mnist_idx.SAMPLE_LABELS, train_split=None, eval_split=None, test_split=None)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # Another run preparing it.
        run = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *tiny_flags(config)], cwd=ROOT,
                               stderr=subprocess.PIPE, text=True)
        seen = []
        for line in run.stderr:
            seen.append(line)
            if "another run is preparing it" in line:
                break
        assert run.poll() is None, "".join(seen)[-3000:]
        tfds.builder("fashion_mnist_sample", data_dir=str(data_dir)).download_and_prepare()  # What it does.
    rest = run.stderr.read()
    assert run.wait(timeout=600) == 0, rest[-3000:]
    assert "preparing it for TFDS" not in "".join(seen) + rest, "it prepared the data again"
    saved = read_flagfile(str(tmp_path / "run" / "flags.txt"))
    assert (saved["train_split"], saved["eval_split"], saved["test_split"]) == ("train", "validation", "test")


@pytest.mark.slow
def test_splits_over_the_image_cache_budget_are_decoded_every_epoch_with_the_same_results(tiny, tmp_path, caplog):
    """--cache=memory within --cache_max_gb only, estimated before decoding: over it, no cache, said in one
    line, and the run ends with the results and weights of the cached run (the same examples in the same
    order)."""
    from helpers import launch_in_process, tiny_flags

    results = []
    for name, budget in (("cached", None), ("streamed", 1e-6)):
        caplog.clear()
        config = tiny(model_dir=str(tmp_path / name), cache_max_gb=budget, epochs=2)
        with caplog.at_level("INFO"):
            assert launch_in_process(*tiny_flags(config))[0] == 0
        assert ("Image cache off: the splits' decoded images would take 0.0 GB of memory, over --cache_max_gb "
                "(0.0 GB); they are decoded every epoch instead" in caplog.text) == (budget is not None)
        cached = "train: train[:1%], 194 examples decoded and cached" in caplog.text
        assert cached == (budget is None) and ("train: train[:1%], 194 examples decoded in" in caplog.text) != cached
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
        weights = keras.saving.load_model(tmp_path / name / "model.keras").get_weights()
        results[-1]["weights"] = [w.tobytes() for w in weights]
    timing = ("images_per_sec", "wall_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in results[1:]] == [
        {k: v for k, v in results[0].items() if k not in timing}]


def test_a_split_reads_in_its_own_order_without_deterministic(tmp_path):
    """Example i of a split is the split's file i (top_losses.png and --job=inspect name files by position)
    even when --deterministic is off: the decode runs in parallel but must not reorder. Large and small
    images alternate, so a reordering map would finish the small ones first."""
    from helpers import tiny_config

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        for index in range(24):
            size = 1200 if index % 3 == 0 else 8
            value = (index * 10 + (label == "b")) % 256
            pixels = np.full((size, size, 3), value, np.uint8)
            (tmp_path / label / f"{index:02d}.png").write_bytes(tf.io.encode_png(pixels).numpy())
    config = tiny_config(dataset=f"folder:{tmp_path}", label_subset=(), train_split="train", eval_split="",
                         test_split="", deterministic=False)
    source = sources.open_source(config)
    split = source.split("train", "train_split")
    examples = pipeline.prepare(split, image_size=8, deterministic=False)
    for index, (image, _) in enumerate(examples.dataset.as_numpy_iterator()):
        with open(source.example_name("train", index), "rb") as f:
            expected = tf.io.decode_png(f.read()).numpy()[0, 0, 0]
        assert image[0, 0, 0] == expected, index

"""Where examples come from: a TFDS dataset or a folder of images, their class names, and exact split
sizes. Both read as (encoded image bytes, label) in a fixed order; decoding happens in the pipeline, so
an undecodable image is skipped and counted there instead of failing here.

Splits are TFDS split strings (`train[:80%]`, `train[80%:90]`, `train+test`) for both: a folder's images
form one split, `train`, cut by TFDS's own ReadInstruction rules, a percent slice applied to each class
(stratified) and an absolute one to the whole folder. Names starting with a dot (`.ipynb_checkpoints`,
`.DS_Store`, `._photo.jpg`) below a folder's root are never classes nor images, here and in --job=predict.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import os
import urllib.error
import urllib.parse
import urllib.request

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from transfer_engine import internals
from transfer_engine.data import fashion_mnist_idx
from transfer_engine.errors import ConfigError, first_line, named

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a Source (a split string) and its size after the label subset, undecodable
    images included (the pipeline counts those)."""

    source: "Source"
    name: str
    num_examples: int


class Source:
    """Examples with labels, relabelled by `--label_subset`. Subclasses say how to read and count."""

    # How split strings select examples, in the names of --cache files (data/pipeline.py): a source whose
    # selection rule changes takes a new tag, so files cached under the old rule are never read as the new.
    split_scheme = ""

    def __init__(self, *, name, class_names, channels, label_subset, contents, num_files):
        self.name = name
        # What the source holds, in short (a folder's names, sizes and times; a TFDS dataset's version), and
        # how many files: in --cache names and a run's record (engine/core/run_dir.py), so that changed data is
        # never read as the old nor mixed into a run begun on it.
        self.contents = contents
        self.num_files = num_files
        self.all_class_names = tuple(class_names)
        self.channels = channels
        self.label_subset = tuple(label_subset)
        for label in self.label_subset:
            if label >= len(self.all_class_names):
                raise ConfigError(
                    "label_subset", self.label_subset,
                    f"{name} has labels 0..{len(self.all_class_names) - 1} only",
                )

    @property
    def class_names(self):
        """After --label_subset: class k is class_names[k]."""
        if not self.label_subset:
            return self.all_class_names
        return tuple(self.all_class_names[label] for label in self.label_subset)

    @property
    def num_classes(self):
        return len(self.class_names)

    def read(self, split):
        """(encoded image bytes, label) pairs of a split, in a fixed order, relabelled by the subset."""
        dataset = self._read(split)
        if not self.label_subset:
            return dataset
        new_label = np.full(len(self.all_class_names), -1, np.int64)
        new_label[list(self.label_subset)] = np.arange(len(self.label_subset))
        new_label = tf.constant(new_label)
        dataset = dataset.map(lambda image, label: (image, tf.gather(new_label, label)))
        return dataset.filter(lambda image, label: label >= 0)

    @property
    def split_names(self):
        """The splits the dataset has (empty when its metadata does not say)."""
        raise NotImplementedError

    def class_counts(self, split):
        """Examples per class of `split` (after the label subset), undecodable ones included: the same
        on every worker, whatever its shard."""
        counts = self._label_counts(split)
        return tuple(int(n) for n in (counts[list(self.label_subset)] if self.label_subset else counts))

    def example_name(self, split, index):
        """How a user finds example `index` of `split` (as read, after the label subset)."""
        return f"{split}[{index}]"

    def split(self, split, flag):
        """The split named by `--flag=split`, with its exact size; refuses one that selects nothing."""
        counts = None
        try:
            if self.label_subset:
                counts = np.array(self.class_counts(split))
                size = int(counts.sum())
            else:
                size = self._size(split)
        except (ValueError, KeyError, tf.errors.OpError) as error:
            if not internals.is_empty_selection(error):
                raise ConfigError(flag, split, f"not a split of {self.name}: {first_line(error)}") from None
            size = 0
        if size == 0:
            raise ConfigError(flag, split, "selects no examples")
        if counts is not None and not counts.all():
            absent = self.label_subset[list(counts).index(0)]
            raise ConfigError(
                "label_subset", self.label_subset, f"label {absent} does not occur in --{flag}={split}"
            )
        return Split(source=self, name=split, num_examples=size)

    def _read(self, split):
        raise NotImplementedError

    def _size(self, split):
        return int(self._label_counts(split).sum())

    def _label_counts(self, split):
        """Examples per original label in `split`."""
        counts = np.zeros(len(self.all_class_names), np.int64)
        labels = self._read(split).map(lambda image, label: label)
        for batch in labels.batch(8192).as_numpy_iterator():
            counts += np.bincount(batch, minlength=len(counts))
        return counts


class TfdsSource(Source):
    """Any TFDS dataset with an `image` and a ClassLabel `label` feature."""

    def __init__(self, builder, *, name, label_subset):
        self.builder = builder
        features = builder.info.features
        super().__init__(
            name=name, class_names=features["label"].names,
            channels=features["image"].shape[-1] or 3, label_subset=label_subset,
            contents=f"v{builder.version}", num_files=sum(split.num_examples for split in builder.info.splits.values()),
        )

    @property
    def split_names(self):
        return tuple(self.builder.info.splits)

    def _read(self, split):
        dataset = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        return dataset.map(lambda example: (example["image"], example["label"]))

    def _size(self, split):
        known = self.builder.info.splits
        if known:  # The metadata knows; mocked datasets have none.
            return known[split].num_examples
        return super()._size(split)


class FolderSource(Source):
    """A folder with one sub-folder of images per class, as one split `train` in a fixed shuffled order
    (seed 0, whatever --seed is), the same across runs. A percent slice (`train[80%:90%]`) takes that share
    of every class, by TFDS's rules on the class's count, so each class is in train, eval and test in
    proportion and consecutive slices still partition the folder; an absolute slice (`train[:10]`) takes
    its examples of the whole order. Either way the examples keep the shuffled order, classes mixed.
    Images in folders inside a class folder belong to that class (a class kept in several folders, e.g. by
    year); hidden names are skipped (`files_below`); other files that are not images by their extension
    are left out and named in the log."""

    split_scheme = "stratified"

    def __init__(self, root, *, label_subset):
        if not os.path.isdir(root):
            raise ConfigError("dataset", FOLDER_PREFIX + root, "no such directory")
        class_names = sorted(
            entry for entry in os.listdir(root) if not _hidden(entry) and os.path.isdir(os.path.join(root, entry))
        )
        files, others = [], []
        for label, name in enumerate(class_names):
            for path in files_below(os.path.join(root, name)):
                if is_image(path):
                    files.append((path, label))
                else:
                    others.append(os.path.relpath(path, root))
        if len(class_names) < 2 or not files:
            loose = sum(is_image(name) and os.path.isfile(os.path.join(root, name)) for name in os.listdir(root))
            raise ConfigError(
                "dataset", FOLDER_PREFIX + root,
                f"needs one sub-folder of images per class ({len(class_names)} sub-folders, {len(files)} images in "
                "them" + (f"; {loose} images beside them: if it is one class's folder, give the folder that holds "
                          "the class folders" if loose else "") + ")",
            )
        empty = [name for label, name in enumerate(class_names) if all(file[1] != label for file in files)]
        if empty:
            raise ConfigError(
                "dataset", FOLDER_PREFIX + root,
                f"class folder {empty[0]} has no image ({', '.join(IMAGE_EXTENSIONS)}); remove it or add images",
            )
        if others:
            logging.info("%s%s: %d files are not images (%s) and are left out: %s", FOLDER_PREFIX, root,
                         len(others), ", ".join(IMAGE_EXTENSIONS), named(others))
        order = np.random.default_rng(0).permutation(len(files))
        self.paths = np.array([files[i][0] for i in order])
        self.labels = np.array([files[i][1] for i in order], np.int64)
        super().__init__(
            name=FOLDER_PREFIX + root, class_names=class_names, channels=3, label_subset=label_subset,
            contents=_fingerprint(root, [path for path, _ in files]), num_files=len(files),
        )

    @property
    def split_names(self):
        return ("train",)

    def _positions(self, split):
        """Positions in the shuffled order that `split` selects, part by part (`train[:10%]+train[-3:]`):
        a percent part cuts each class, an absolute part the whole order."""
        everything = np.arange(len(self.labels))
        classes = [everything[self.labels == label] for label in range(len(self.all_class_names))]
        chosen = []
        for part, percent in internals.split_parts(split):
            chosen.append(np.sort(np.concatenate([
                group[r] for group in (classes if percent else [everything])
                for r in internals.split_slices(part, len(group))
            ])))
        return np.concatenate(chosen)

    def _read(self, split):
        paths, labels = self._selected(split, self.paths), self._selected(split, self.labels)
        paths = np.array([os.fsencode(path) for path in paths], object)  # As bytes: a name need not be UTF-8.
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(  # In order: example_name's i is file i.
            lambda path, label: (tf.io.read_file(path), label), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def example_name(self, split, index):
        paths, labels = self._selected(split, self.paths), self._selected(split, self.labels)
        if self.label_subset:
            paths = paths[np.isin(labels, self.label_subset)]
        return str(paths[index])

    def _selected(self, split, values):
        return values[self._positions(split)]

    def _label_counts(self, split):
        labels = self._selected(split, self.labels)
        return np.bincount(labels, minlength=len(self.all_class_names))


SPLIT_FLAGS = ("train_split", "eval_split", "test_split")
ONLY_TRAIN = ("train[:80%]", "train[80%:90%]", "train[90%:]")  # The ResNet50 tutorial's cut.


def with_default_splits(config, source):
    """`config` with each split flag it leaves open (None: not given) set by the splits `source` has:
    train / validation / test; train[:90%] / train[90%:] / test without validation; and ONLY_TRAIN for a
    dataset of one split, train (a folder, cats_vs_dogs), said in the log."""
    open_flags = [flag for flag in SPLIT_FLAGS if getattr(config, flag) is None]
    if not open_flags:
        return config
    names = set(source.split_names)
    if names == {"train"}:
        defaults = dict(zip(SPLIT_FLAGS, ONLY_TRAIN))
        logging.info("Splits: %s has one split, train: %s (set the flags to choose others)", source.name,
                     ", ".join(f"--{flag}={defaults[flag]}" for flag in open_flags))
    else:
        validation = "validation" in names
        defaults = {
            "train_split": "train" if validation else "train[:90%]",
            "eval_split": "validation" if validation else "train[90%:]",
            "test_split": "test" if "test" in names or not names else "",
        }
    return dataclasses.replace(config, **{flag: defaults[flag] for flag in open_flags})


def files_below(folder):
    """Every file in `folder` and the folders inside it, in a fixed (sorted) order, without hidden ones:
    a name starting with a dot at any level below `folder` is a notebook's checkpoints, a Mac's
    `.DS_Store` or `._photo.jpg` (metadata that ends in .jpg but is no image), never data."""
    walk = []
    for directory, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not _hidden(name)]  # os.walk then skips the others.
        walk.append((directory, sorted(name for name in names if not _hidden(name))))
    for directory, names in sorted(walk):
        yield from (os.path.join(directory, name) for name in names)


def _fingerprint(root, paths):
    """A short hash of the images' names (below `root`), sizes and modification times: it changes when an
    image is added, removed, renamed, moved to another class or rewritten."""
    digest = hashlib.sha1()
    for path in paths:
        status = os.stat(path)
        digest.update(b"%s\0%d\0%d\n" % (os.fsencode(os.path.relpath(path, root)), status.st_size, status.st_mtime_ns))
    return digest.hexdigest()[:12]


def is_image(path):
    """Whether a file is read as an image (by its extension, as a folder dataset and --job=predict do)."""
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(name):
    return name.startswith(".")


def open_source(config):
    """Finds, prepares (downloading if needed) and describes the dataset named by --dataset."""
    name = config.dataset
    if name.startswith(FOLDER_PREFIX):
        return FolderSource(name[len(FOLDER_PREFIX):], label_subset=config.label_subset)
    manual_dir = config.manual_dir
    idx_dir = fashion_mnist_idx.find_files(manual_dir) if name == "fashion_mnist" else None
    if idx_dir:
        logging.info("fashion_mnist: reading the local IDX files in %s", idx_dir)
        builder_name, manual_dir = "fashion_mnist_idx", idx_dir
    else:
        builder_name = name
    try:
        builder = tfds.builder(builder_name, data_dir=config.data_dir)
    except tfds.core.DatasetNotFoundError:
        raise ConfigError(
            "dataset", name, "is not a TFDS dataset (see tfds.list_builders()) nor folder:PATH"
        ) from None
    features = builder.info.features
    keys = set(features.keys())
    if "image" not in keys or "label" not in keys or not isinstance(
        features["label"], tfds.features.ClassLabel
    ):
        raise ConfigError("dataset", name, "has no 'image' and ClassLabel 'label' features")
    if not builder.data_path.exists():  # TFDS's own test (is_prepared() warns when it is not).
        with _preparing(builder, name) as prepared_meanwhile:
            if not prepared_meanwhile:
                _prepare(builder, name, manual_dir)
        builder = tfds.builder(builder_name, data_dir=config.data_dir)  # With what preparing found (splits).
    return TfdsSource(builder, name=name, label_subset=config.label_subset)


@contextlib.contextmanager
def _preparing(builder, name):
    """Holds a lock on preparing `builder`'s data (a hidden file beside its version folder), waiting for
    another run that holds it; yields whether that run prepared it meanwhile. Two first runs at once on a
    fresh machine would otherwise both prepare it, and the second fail renaming its copy into place."""
    path = os.path.join(os.path.dirname(os.fspath(builder.data_path)), f".{builder.version}.preparing")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "a")
    except OSError as error:
        raise ConfigError("data_dir", os.fspath(builder.data_dir_root), f"is not writable ({error.strerror})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("%s: another run is preparing it in %s; waiting for it", name, builder.data_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield builder.data_path.exists()


# Builders this project prepares from files on this machine: no download, so no progress to show.
LOCAL_BUILDERS = ("fashion_mnist_idx", "fashion_mnist_sample")
PROBE_SECONDS = 5


def _prepare(builder, name, manual_dir):
    """Downloads (after checking the network answers) and prepares a TFDS dataset once, into
    --data_dir; a local one quietly, with one line instead of TFDS's prints and progress bars."""
    offline_advice = (
        "point --data_dir at a prepared TFDS copy or --manual_dir at its downloaded files"
        + (", or install Debian's dataset-fashion-mnist package" if name == "fashion_mnist" else "")
    )
    local = builder.name in LOCAL_BUILDERS
    if local:
        logging.info("%s: preparing it for TFDS in %s (once)", name, builder.data_dir)
    elif not manual_dir:
        unreachable = _unreachable(builder.url_infos or {})
        if unreachable:
            raise ConfigError("dataset", name, f"must be downloaded, but {unreachable}; offline, {offline_advice}")
    quiet = contextlib.redirect_stdout(io.StringIO()) if local else contextlib.nullcontext()
    tfds.display_progress_bar(not local)
    try:
        with quiet:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    except Exception as error:  # TFDS raises several kinds; any other is re-raised.
        if not internals.is_prepare_failure(error):
            raise
        raise ConfigError(
            "dataset", name, f"could not be downloaded or prepared ({first_line(error)}); {offline_advice}"
        ) from None
    finally:
        tfds.display_progress_bar(True)


def _unreachable(urls):
    """Why the host of the first of `urls` cannot be reached (None if it answers, or there is no URL):
    one request, PROBE_SECONDS at most, through the same proxies as TFDS's downloads. Offline, TFDS
    would retry each file for minutes before failing."""
    url = next(iter(urls), None)
    if url is None:
        return None
    host = urllib.parse.urlsplit(url)
    try:
        urllib.request.urlopen(
            urllib.request.Request(f"{host.scheme}://{host.netloc}/", method="HEAD"), timeout=PROBE_SECONDS
        ).close()
    except urllib.error.HTTPError:
        return None  # It answered.
    except (OSError, ValueError) as error:
        return f"{host.netloc} cannot be reached ({getattr(error, 'reason', error)})"
    return None

"""Where examples come from: a TFDS builder, its class names, and exact split sizes.

Any TFDS dataset with an `image` and a ClassLabel `label` works. `fashion_mnist` is read from local IDX
files when they are present (see data/fashion_mnist_idx.py), so it works offline.
"""

import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data import fashion_mnist_idx
from engine.config import ConfigError, first_line


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    builder: tfds.core.DatasetBuilder
    class_names: tuple  # After --label_subset: class k is class_names[k].
    channels: int
    label_subset: tuple  # Original label ids kept, in their new order; () keeps all.

    @property
    def num_classes(self):
        return len(self.class_names)

    def read(self, split):
        """(encoded image bytes, label) pairs of a split, in a fixed order, relabelled by the subset."""
        dataset = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        )
        dataset = dataset.map(lambda example: (example["image"], example["label"]))
        if not self.label_subset:
            return dataset
        new_label = np.full(self.builder.info.features["label"].num_classes, -1, np.int64)
        new_label[list(self.label_subset)] = np.arange(len(self.label_subset))
        new_label = tf.constant(new_label)
        dataset = dataset.map(lambda image, label: (image, tf.gather(new_label, label)))
        return dataset.filter(lambda image, label: label >= 0)

    def split(self, split, flag):
        """The split named by `--flag=split`, with its exact size."""
        return Split(source=self, name=split, num_examples=self.count(split, flag))

    def count(self, split, flag):
        """Examples in `split` (after the label subset); refuses a split that selects none."""
        known = self.builder.info.splits
        try:
            if self.label_subset or not known:  # Mocked datasets have no split metadata.
                size = self._count_labels(split, flag)
            else:
                size = known[split].num_examples
        except (ValueError, KeyError, tf.errors.OpError) as error:
            if "corresponds to no data" not in str(error):  # TFDS' words for an empty selection.
                raise ConfigError(flag, split, f"not a split of {self.name}: {first_line(error)}") from None
            size = 0
        if size == 0:
            raise ConfigError(flag, split, "selects no examples")
        return size

    def _count_labels(self, split, flag):
        labels = self.builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()}
        ).map(lambda example: example["label"])
        counts = np.zeros(self.builder.info.features["label"].num_classes, np.int64)
        for batch in labels.batch(8192).as_numpy_iterator():
            counts += np.bincount(batch, minlength=len(counts))
        if not self.label_subset:
            return int(counts.sum())
        absent = [label for label in self.label_subset if counts[label] == 0]
        if absent:
            raise ConfigError(
                "label_subset", self.label_subset,
                f"label {absent[0]} does not occur in --{flag}={split}",
            )
        return int(counts[list(self.label_subset)].sum())


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a Source (a TFDS split string) and its exact size after the label subset."""

    source: Source
    name: str
    num_examples: int


def open_source(config):
    """Finds, prepares (downloading if needed) and describes the dataset named by --dataset."""
    name = config.dataset
    manual_dir = config.manual_dir
    idx_dir = fashion_mnist_idx.find_files(manual_dir) if name == "fashion_mnist" else None
    if idx_dir:
        logging.info("fashion_mnist: reading the local IDX files in %s", idx_dir)
        builder_name, manual_dir = "fashion_mnist_idx", idx_dir
    else:
        builder_name = name
    try:
        builder = tfds.builder(builder_name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ConfigError("dataset", name, "is not a TFDS dataset (see tfds.list_builders())") from None
    features = builder.info.features
    keys = set(features.keys())
    if "image" not in keys or "label" not in keys or not isinstance(
        features["label"], tfds.features.ClassLabel
    ):
        raise ConfigError("dataset", name, "has no 'image' and ClassLabel 'label' features")
    try:
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
        )
    except Exception as error:  # Network, checksum and manual-download failures all land here.
        raise ConfigError(
            "dataset", name,
            f"could not be downloaded or prepared ({first_line(error)}); point --data_dir at a "
            "prepared TFDS copy or --manual_dir at its downloaded files",
        ) from None

    names = tuple(features["label"].names)
    for label in config.label_subset:
        if label >= len(names):
            raise ConfigError(
                "label_subset", config.label_subset, f"{name} has labels 0..{len(names) - 1} only"
            )
    if config.label_subset:
        names = tuple(names[label] for label in config.label_subset)
    channels = features["image"].shape[-1] or 3
    return Source(
        name=name, builder=builder, class_names=names, channels=channels,
        label_subset=tuple(config.label_subset),
    )


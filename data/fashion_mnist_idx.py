"""Fashion-MNIST from local IDX files, as a TFDS dataset.

Debian's `dataset-fashion-mnist` package ships the standard four IDX files, but recompressed, so
their checksums differ from the ones TFDS registers and TFDS's own `fashion_mnist` refuses them as a
manual download. This builder reads the same files from a manual dir instead; the prepared dataset
has TFDS's `fashion_mnist` features, class names and splits, so split strings such as
`train[:80%]` work unchanged.
"""

import gzip
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def find_files(manual_dir):
    """Returns the directory holding all four IDX files (manual_dir, else Debian's), or None."""
    for directory in (manual_dir, DEBIAN_DIR):
        if directory and all(
            os.path.exists(os.path.join(directory, name))
            for images, labels, _ in FILES.values()
            for name in (images, labels)
        ):
            return directory
    return None


def read_idx(path, magic, count):
    """Reads one gzipped IDX file, checking its magic number and item count."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:8], dtype=">i4")
    if header[0] != magic or header[1] != count:
        raise ValueError(f"{path}: not an IDX file of {count} items (header {header.tolist()})")
    if magic == _IMAGES_MAGIC:
        return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 28, 28, 1)
    return np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)


class FashionMnistIdx(mnist.FashionMNIST):
    """TFDS's fashion_mnist, prepared from the IDX files in a manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the four Fashion-MNIST IDX .gz files in the manual dir, or install Debian's "
        f"dataset-fashion-mnist package (which puts them in {DEBIAN_DIR})."
    )

    def _split_generators(self, dl_manager):
        directory = find_files(str(dl_manager.manual_dir))
        return {
            split: self._generate_examples(
                os.path.join(directory, images), os.path.join(directory, labels), count
            )
            for split, (images, labels, count) in FILES.items()
        }

    def _generate_examples(self, images_path, labels_path, count):
        images = read_idx(images_path, _IMAGES_MAGIC, count)
        labels = read_idx(labels_path, _LABELS_MAGIC, count)
        for index, png in enumerate(encode_png(images)):
            yield index, {"image": png, "label": labels[index]}


def encode_png(images):
    """PNG bytes of each image, in order: the op TFDS encodes an array with (so the same bytes), run
    in one parallel tf.data pass instead of one eager call per image."""
    encoded = tf.data.Dataset.from_tensor_slices(images).map(
        tf.image.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    for batch in encoded.batch(4096).as_numpy_iterator():  # Batches: per-element iteration is slow too.
        yield from batch

"""Fashion-MNIST from local IDX files, as TFDS datasets: the whole set, and the sample shipped here.

Debian's `dataset-fashion-mnist` package ships the standard four IDX files, but recompressed, so
their checksums differ from the ones TFDS registers and TFDS's own `fashion_mnist` refuses them as a
manual download. `fashion_mnist_idx` reads the same files from a manual dir instead; the prepared
dataset has TFDS's `fashion_mnist` features, class names and splits, so split strings such as
`train[:80%]` work unchanged.

`fashion_mnist_sample` is the part of Fashion-MNIST the main job (configs/frozen.flags) reads, shipped
in data/fashion_mnist_sample/ as IDX files (MIT licence, its LICENSE beside them), so that job needs no
download and no system package: see SAMPLE.
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
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_sample")
# The sample's splits, each the examples of a split of the whole set (fashion_mnist_idx, in its
# prepared order) with the labels below (T-shirt/top, Pullover, Shirt): those configs/frozen.flags
# trains, evaluates and tests on, so its runs equal those on the whole set.
SAMPLE = {"train": "train[:2%]", "validation": "train[90%:]", "test": "test"}
SAMPLE_LABELS = (0, 2, 6)
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
    """Reads one gzipped IDX file, checking its magic number and item count (None: any)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    header = np.frombuffer(data[:8], dtype=">i4")
    if header[0] != magic or (count is not None and header[1] != count):
        raise ValueError(f"{path}: not an IDX file of {count} items (header {header.tolist()})")
    count = int(header[1])
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


class FashionMnistSample(FashionMnistIdx):
    """The sample shipped in SAMPLE_DIR: splits train, validation and test (see SAMPLE), each in the
    order of its files."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = None  # Its files come with this project.

    def _info(self):
        whole = super()._info()
        return tfds.core.DatasetInfo(
            builder=self, description=f"A sample of Fashion-MNIST ({SAMPLE}, labels {SAMPLE_LABELS}).",
            features=whole.features, supervised_keys=whole.supervised_keys, homepage=whole.homepage,
            citation=whole.citation, disable_shuffling=True,  # The files' order, which is the whole set's.
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*sample_paths(split), None) for split in SAMPLE}


def sample_paths(split):
    """The sample's images and labels IDX files of `split`."""
    return tuple(os.path.join(SAMPLE_DIR, f"{split}-{kind}.gz") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def write_sample(whole, out_dir=SAMPLE_DIR):
    """Writes the sample's IDX files from `whole`, the prepared fashion_mnist_idx builder; this made
    data/fashion_mnist_sample/ (gzip without a time stamp, so the same bytes every time)."""
    os.makedirs(out_dir, exist_ok=True)
    for split, selection in SAMPLE.items():
        examples = whole.as_dataset(split=selection, shuffle_files=False).filter(
            lambda example: tf.reduce_any(example["label"] == SAMPLE_LABELS)
        )
        images, labels = zip(*((e["image"], e["label"]) for e in examples.as_numpy_iterator()))
        for name, magic, array in zip(
            sample_paths(split), (_IMAGES_MAGIC, _LABELS_MAGIC), (np.stack(images), np.array(labels, np.uint8))
        ):
            header = np.array([magic, *array.shape[:3]], ">i4")  # Images: count, rows, columns.
            path = os.path.join(out_dir, os.path.basename(name))
            with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
                f.write(header.tobytes() + array.tobytes())


def encode_png(images):
    """PNG bytes of each image, in order: the op TFDS encodes an array with (so the same bytes), run
    in one parallel tf.data pass instead of one eager call per image."""
    encoded = tf.data.Dataset.from_tensor_slices(images).map(
        tf.image.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    for batch in encoded.batch(4096).as_numpy_iterator():  # Batches: per-element iteration is slow too.
        yield from batch

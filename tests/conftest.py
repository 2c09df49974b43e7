"""Shared test set-up: two logical CPU devices, one prepared Fashion-MNIST, tiny configs, launch.py.

Tests are fast by construction: small_cnn at 32 px, a few steps, small splits. Multi-replica semantics
run on two logical CPU devices (what `--cpu_replicas=2` does in launch.py).
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from transfer_engine import internals  # noqa: E402,F401  First: TensorFlow's process defaults, as launch.py runs with them.
import keras  # noqa: E402

from transfer_engine.engine import distribute  # noqa: E402
from helpers import tiny_config  # noqa: E402

distribute.split_cpu(2)  # Before TensorFlow initialises its devices.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with Fashion-MNIST prepared from the offline IDX files (once per session)."""
    from transfer_engine.data import sources

    path = str(tmp_path_factory.mktemp("tfds"))
    sources.open_source(tiny_config(data_dir=path))
    return path


@pytest.fixture
def tiny(data_dir):
    """Factory of tiny configs bound to the session's data dir."""
    return lambda **overrides: tiny_config(**{"data_dir": data_dir, **overrides})


@pytest.fixture(autouse=True)
def float32_policy():
    """Each test starts (and leaves) Keras in float32, whatever it set."""
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def pretrained_run(data_dir, tmp_path_factory):
    """A finished tiny scratch run: its dir and backbone.weights.h5 stand in for pretrained weights
    (trained, so BatchNorm statistics are not their initial 0 and 1)."""
    from helpers import train_run

    model_dir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(data_dir=data_dir, train_split="train[:3%]", epochs=1)
    train_run(config, model_dir)
    return str(model_dir)

"""Shared test set-up: two logical CPU devices, one prepared Fashion-MNIST, tiny configs, launch.py, and
runs trained once per session for the tests that only read them.

Tests are fast by construction: small_cnn at 32 px, a few steps, small splits. Multi-replica semantics
run on two logical CPU devices (what `--cpu_replicas=2` does in launch.py). Under pytest-xdist (setup.cfg
runs a worker per core), each worker and the processes it starts get their share of the cores, the slow
tests start first (so that no long one is left to run alone at the end), and what a session fixture makes
(the prepared data, the shared runs) is made once for every worker.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:  # Before TensorFlow loads; the processes tests start inherit it.
    os.environ.setdefault("TF_NUM_INTRAOP_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))


def pytest_configure(config):
    """TensorFlow as launch.py sets it up, and two logical CPU devices, in each process that runs tests
    (not in pytest-xdist's controller, which only hands them out)."""
    if hasattr(config, "workerinput") or config.getoption("dist", "no") == "no":
        from transfer_engine import internals  # noqa: F401  First: TensorFlow's process defaults, as launch.py runs with them.
        from transfer_engine.engine.core import distribute

        distribute.split_cpu(2)  # Before TensorFlow initialises its devices.


def pytest_collection_modifyitems(items):
    """The longest tests first, then the other slow ones (a stable sort: otherwise in file order)."""
    items.sort(key=lambda item: (item.get_closest_marker("longest") is None, item.get_closest_marker("slow") is None))


def _escaped(value):
    """`value` with every string encodable as UTF-8 (undecodable file names become backslash escapes)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_escaped(item) for item in value)
    return value


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): a worker per core, up to 4 (each holds a TensorFlow of its own)."""
    return min(os.cpu_count() or 1, 4)


@pytest.hookimpl(tryfirst=True)
def pytest_report_to_serializable(config, report):
    """What an xdist worker sends of a report: pytest's own serialisation, made safe for execnet, which
    refuses strings that are not UTF-8 (a test's log may name a file whose name is not)."""
    if isinstance(report, (pytest.TestReport, pytest.CollectReport)):
        return {**_escaped(report._to_json()), "$report_type": type(report).__name__}
    return None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A TFDS data dir with Fashion-MNIST prepared from the offline IDX files (once per session)."""
    from transfer_engine.data import sources
    from helpers import shared, tiny_config

    return shared(tmp_path_factory, "tfds", lambda path: sources.open_source(tiny_config(data_dir=path)))


@pytest.fixture
def tiny(data_dir):
    """Factory of tiny configs bound to the session's data dir."""
    from helpers import tiny_config

    return lambda **overrides: tiny_config(**{"data_dir": data_dir, **overrides})


@pytest.fixture(autouse=True)
def float32_policy():
    """Each test starts (and leaves) Keras in float32, whatever it set."""
    import keras

    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.fixture(scope="session")
def pretrained_run(data_dir, tmp_path_factory):
    """A finished tiny scratch run: its dir and backbone.weights.h5 stand in for pretrained weights
    (trained, so BatchNorm statistics are not their initial 0 and 1)."""
    from helpers import shared, tiny_config, train_run

    config = tiny_config(data_dir=data_dir, train_split="train[:3%]", epochs=1)
    return shared(tmp_path_factory, "pretrained", lambda path: train_run(config, path))


@pytest.fixture(scope="session")
def mode_runs(data_dir, pretrained_run, tmp_path_factory):
    """--job=compare's folder of one tiny config (from the pretrained run, BatchNorm training where the
    backbone trains, dropout, a staged switch): a run per mode, scratch, frozen, finetune, staged and lora,
    made once per session for the tests that only read them (one that changes a run copies it first)."""
    from transfer_engine.engine.jobs import compare
    from helpers import replace, shared, tiny_config

    config = tiny_config(data_dir=data_dir, job="compare", weights=pretrained_run, unfreeze=2, bn="train",
                         head_epochs=1, epochs=2, backbone_lr_mult=0.5, dropout=0.3, train_split="train[:2%]")
    return shared(tmp_path_factory, "mode_runs",
                  lambda path: compare.compare(replace(config, model_dir=path)))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """An xdist worker, its results sent, leaves without TensorFlow's teardown, which the controller would
    wait for (seconds of every run of the suite)."""
    if hasattr(config, "workerinput"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

"""The jobs (`--job=`): one module each below, one function each, taking a validated config (evaluate,
export and predict get the run's own, completed from its flags.txt: engine/config.py).

    train      training.py   assemble, resume, train, write the run's results
    evaluate   evaluate.py   the latest checkpoint on the eval and test splits, with train's reports
    export     export.py     model.keras as SavedModel / LiteRT artifacts, checked on the test split
    predict    predict.py    model.keras on image files -> predictions.csv
    benchmark  benchmark.py  throughput per mode against Keras' fit
    compare    compare.py    every mode with the same flags, side by side
    lr_find    lr_find.py    a learning-rate range test: lr_find.json and lr_find.png
    inspect    inspect.py    duplicates and suspect labels in the data, before training

A job sits above the reports (engine/reports/), which sit above the core that trains (engine/core/).
"""

from transfer_engine import internals
from transfer_engine.engine.core import distribute
from transfer_engine.engine.core.run_dir import check_temporary_space
from transfer_engine.engine.jobs import benchmark, compare, evaluate, export, inspect, lr_find, predict, training


def run(config):
    """Runs `config.job`: the one path of launch.py and the Python API. Returns what the job returns."""
    prepare_process(config)
    return JOBS[config.job](config)


def prepare_process(config):
    """What the process needs before any job of `config` (the API's predict on arrays calls it too): the
    libraries' versions checked, room in the temporary directory, and the CPU split into replicas before
    anything initialises TensorFlow's devices."""
    internals.check_versions()
    check_temporary_space()
    if config.cpu_replicas > 1:
        distribute.split_cpu(config.cpu_replicas)


JOBS = {
    "train": training.train,
    "evaluate": evaluate.evaluate,
    "export": export.export,
    "predict": predict.predict,
    "benchmark": benchmark.benchmark,
    "compare": compare.compare,
    "lr_find": lr_find.lr_find,
    "inspect": inspect.inspect,
}

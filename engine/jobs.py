"""The jobs (`--job=`): one function each, taking a validated config (evaluate, export and predict get
the run's own, completed from its flags.txt: engine/config.py).

    train      engine/training.py   assemble, resume, train, write the run's results
    evaluate   here                 the latest checkpoint on the eval and test splits
    export     engine/export.py     model.keras as SavedModel / LiteRT artifacts, checked on the test split
    predict    engine/predict.py    model.keras on image files -> predictions.csv
    benchmark  engine/benchmark.py  throughput per mode against Keras' fit
    compare    engine/compare.py    every mode with the same flags, side by side
    lr_find    engine/lr_find.py    a learning-rate range test: lr_find.json and lr_find.png
    inspect    engine/inspect.py    duplicates and suspect labels in the data, before training
"""


from absl import logging

from transfer_engine import internals
from transfer_engine.engine import (assembly, benchmark, compare, distribute, export, inspect, lr_find, predict, predictions,
                                    reports, training)
from transfer_engine.engine.run_dir import RunDir, check_temporary_space
from transfer_engine.engine.trainer import Stages
from transfer_engine.errors import ConfigError


def evaluate(config, *, report_list=reports.DEFAULT):
    """Evaluates the latest checkpoint of --model_dir on the eval and test splits: one prediction pass
    each, and the reports --job=train writes (engine/reports.py), in evaluation.json and beside it."""
    run_dir = RunDir(config.model_dir)
    run_dir.refuse_if_training("evaluate")
    run = assembly.build(config, pretrained=False)
    restored = run.checkpoints.restore(model_only=True)
    if not restored:
        raise ConfigError("model_dir", config.model_dir, "has no checkpoint to evaluate")
    changed = run_dir.data_changed(run.source)
    if changed:
        logging.warning("--dataset=%s: %s: eval and test now hold other images than the run's, maybe some it "
                        "trained on", run.source.name, changed)
    trainer = Stages(run)(run.epochs_done)
    predicted = {name: predictions.predict(run, trainer, name) for name in ("eval", "test")}
    evaluation = {"job": "evaluate", "checkpoint": restored, **reports.write(report_list, reports.Finished(
        run, run_dir, predicted, step=int(run.state.step.numpy()), measured=("eval", "test")))}
    run_dir.write_json("evaluation.json", evaluation)
    logging.info(
        "Evaluated %s: eval accuracy %s, test accuracy %s (%s test examples)",
        restored, reports.fmt(evaluation["eval_accuracy"]), reports.fmt(evaluation["test_accuracy"]),
        evaluation["test_examples"],
    )
    return evaluation


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
    "evaluate": evaluate,
    "export": export.export,
    "predict": predict.predict,
    "benchmark": benchmark.benchmark,
    "compare": compare.compare,
    "lr_find": lr_find.lr_find,
    "inspect": inspect.inspect,
}

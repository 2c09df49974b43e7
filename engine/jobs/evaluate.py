"""`--job=evaluate`: the latest checkpoint of a run on its eval and test splits, one prediction pass each,
with the reports `--job=train` writes (engine/reports/): evaluation.json and the pictures beside it."""

from absl import logging

from transfer_engine.engine import reports
from transfer_engine.engine.core import assembly
from transfer_engine.engine.core.run_dir import RunDir
from transfer_engine.engine.core.steps import Stages
from transfer_engine.engine.reports import predictions
from transfer_engine.errors import ConfigError


def evaluate(config, *, report_list=reports.DEFAULT):
    """Evaluates the latest checkpoint of --model_dir on the eval and test splits: one prediction pass
    each, and the reports --job=train writes, in evaluation.json and beside it."""
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

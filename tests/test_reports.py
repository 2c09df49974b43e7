"""What a finished run reports (engine/reports/__init__.py, engine/reports/predictions.py): results.json's schema, and
--job=evaluate writing what --job=train wrote for the same checkpoint."""

import dataclasses
import json
import os
import re
import shutil

import pytest

from helpers import ROOT, launch_in_process

PICTURES = ("confusion.png", "top_losses.png", "coverage.png")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def documented_keys():
    """The keys docs/using-a-trained-model.md#resultsjson lists, in its table's order."""
    with open(os.path.join(ROOT, "docs", "using-a-trained-model.md")) as f:
        section = f.read().split("### results.json", 1)[1].split("\n## ", 1)[0]
    return [key for row in re.findall(r"^\| (`.+?) \|", section, re.M) for key in re.findall(r"`(\w+)`", row)
            if not row.startswith("`key")]


def test_results_json_is_the_results_dataclass_and_the_docs_list_every_key(pretrained_run):
    from transfer_engine.engine.jobs.training import Results

    fields = [field.name for field in dataclasses.fields(Results)]
    results = read_json(os.path.join(pretrained_run, "results.json"))
    assert sorted(results) == sorted(fields), "results.json is not Results' fields"
    documented = [key for key in documented_keys() if key in fields]
    assert documented == fields, f"docs/using-a-trained-model.md#resultsjson: {set(fields) - set(documented)} missing"


@pytest.mark.slow  # Decodes, restores and evaluates a run (seconds): the fast tier stays within a minute.
def test_evaluate_writes_the_pictures_and_figures_train_wrote_for_the_same_checkpoint(pretrained_run, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(pretrained_run, run)
    trained = {name: open(os.path.join(run, name), "rb").read() for name in PICTURES}
    for name in PICTURES:
        os.remove(os.path.join(run, name))
    status, stderr = launch_in_process("--job=evaluate", f"--model_dir={run}")
    assert status == 0, stderr
    for name in PICTURES:
        with open(os.path.join(run, name), "rb") as f:
            assert f.read() == trained[name], f"evaluate drew another {name} than train for the same checkpoint"
    results, evaluation = (read_json(os.path.join(run, name)) for name in ("results.json", "evaluation.json"))
    reported = [key for key in results if key.startswith("test_")] + ["calibration"]
    assert {key: evaluation[key] for key in reported} == {key: results[key] for key in reported}
    assert evaluation["eval_examples"] == results["calibration"]["fitted_on_eval_examples"] == 36  # Of 3 classes.
    assert evaluation["eval_accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-12)

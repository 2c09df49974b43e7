"""engine/jobs/compare.py: --job=compare trains every mode in its own directory and reports them side by
side (table and plot); a mode that fails is reported and the others still run."""

import json
import pathlib

import numpy as np
import pytest

from transfer_engine.engine.jobs import compare
from transfer_engine.engine.config import Config, validate
from transfer_engine.errors import ConfigError
from helpers import hparams_rows, launch, launch_in_process, tiny_flags

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = ["scratch", "frozen", "finetune", "staged", "lora"]


def _row(table, mode):
    return next(line for line in table.splitlines() if line.startswith(f"| {mode} | "))


@pytest.mark.slow
def test_compare_trains_every_mode_in_its_own_dir_and_tabulates_them(mode_runs):
    folder = pathlib.Path(mode_runs)  # The session's compare: made once, read by other tests too.
    report = json.loads((folder / "compare.json").read_text())

    assert sorted(report["modes"]) == sorted(MODES)
    table = (folder / "compare.md").read_text()
    assert sorted(MODES, key=lambda mode: table.index(f"| {mode} | ")) == MODES  # The table in the modes' order.
    results = {mode: json.loads((folder / mode / "results.json").read_text()) for mode in MODES}
    for mode in MODES:
        row = _row(table, mode)
        assert row.startswith(f"| {mode} | done | "), row
        assert f" {results[mode]['test_accuracy']:.4f} " in row, (mode, row)
        assert f" {results[mode]['trainable_params']:,} " in row, (mode, row)
        assert [point["epoch"] for point in report["modes"][mode]["curves"]] == [1, 2], mode
        assert results[mode]["trainability_audit"]["frozen_changed"] == 0, mode
    # Each mode really is that mode, with the rest of the flags unchanged.
    assert [results[mode]["mode"] for mode in MODES] == ["scratch", "frozen", "finetune", "finetune", "lora"]
    flags = {mode: (folder / mode / "flags.txt").read_text() for mode in MODES}
    assert "--head_epochs=1" in flags["staged"] and "--head_epochs=0" in flags["finetune"]
    assert "--backbone_lr_mult=1.0" in flags["scratch"] and "--backbone_lr_mult=0.5" in flags["finetune"]
    assert "--backbone_lr_mult=1.0" in flags["lora"]  # New factors: the full rate.
    assert all("--seed=42" in text for text in flags.values())
    trainable = {mode: results[mode]["trainable_params"] for mode in MODES}
    assert trainable["frozen"] < trainable["finetune"] == trainable["staged"] < trainable["scratch"]
    assert trainable["frozen"] < trainable["lora"] < trainable["scratch"]
    # Per-class test accuracy, for the three classes of the task.
    assert "| mode | Shirt | T-shirt/top | Pullover |" in table
    assert "Test accuracy against scratch: frozen " in table
    assert (folder / "compare.png").read_bytes().startswith(PNG_SIGNATURE)
    # Each mode's confusion matrix: in compare.md as counts, and beside its results as a picture.
    for mode in MODES:
        matrix = results[mode]["test_confusion_matrix"]
        assert matrix["classes"] == ["Shirt", "T-shirt/top", "Pullover"]
        block = table.split(f"\n{mode}:\n", 1)[1]
        for true, row in zip(matrix["classes"], matrix["counts"]):
            assert f"| {true} | " + " | ".join(f"{n:,}" for n in row) + " |" in block, (mode, true)
        assert (folder / mode / "confusion.png").read_bytes().startswith(PNG_SIGNATURE)
    # `tensorboard --logdir` on the comparison: one HParams row per mode, with its test accuracy.
    rows = hparams_rows(folder)
    assert sorted(rows) == sorted(f"{mode}/logs" for mode in MODES)
    for mode in MODES:
        hparams, scalars = rows[f"{mode}/logs"]
        assert hparams["mode"] == results[mode]["mode"] and hparams["backbone"] == "small_cnn"
        assert scalars[(f"{mode}/logs/test", "accuracy")] == pytest.approx(results[mode]["test_accuracy"])
        assert scalars[(f"{mode}/logs/eval", "accuracy")] == pytest.approx(results[mode]["eval_accuracy"])


def test_the_plot_has_a_line_per_mode_and_says_which_failed(tmp_path):
    curve = [{"epoch": 1, "eval_loss": 1.0, "eval_accuracy": 0.5},
             {"epoch": 2, "eval_loss": 0.8, "eval_accuracy": 0.6}]
    report = {
        "config": {"backbone": "small_cnn", "dataset": "fashion_mnist", "head_epochs": 1},
        "modes": {"scratch": {"status": "done", "curves": curve},
                  "frozen": {"status": "failed: --weights=x: no", "curves": []},
                  "staged": {"status": "done", "curves": curve}},
    }
    labels = compare.plot(report, tmp_path / "plot.png")
    assert labels == ["scratch", "frozen (failed)", "staged"]
    assert (tmp_path / "plot.png").read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.slow
def test_a_failing_mode_is_reported_and_the_others_still_run(tiny, tmp_path, caplog):
    broken = tmp_path / "broken.weights.h5"
    broken.write_bytes(b"not an HDF5 file")
    config = tiny(job="compare", weights=str(broken), unfreeze=2, model_dir=str(tmp_path / "compare"))
    caplog.set_level("INFO", logger="absl")
    status, stderr = launch_in_process(*tiny_flags(config))  # A bug would raise here.

    assert status == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"error: compare: frozen, finetune, lora failed; the table is in {tmp_path}/compare/compare.md"
    )
    assert "Compare: mode 2 of 4: frozen" in caplog.text  # Progress says which mode of how many.
    assert "[1/4 scratch] epoch 1/1" in stderr
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert _row(table, "scratch").startswith("| scratch | done | ")
    for mode in ("frozen", "finetune", "lora"):
        assert _row(table, mode).startswith(f"| {mode} | failed: --weights={broken}: "), _row(table, mode)
    assert (tmp_path / "compare" / "scratch" / "results.json").exists()
    assert (tmp_path / "compare" / "compare.png").exists()


def test_compare_needs_a_finetune_rule():
    with pytest.raises(ConfigError, match="--job=compare needs exactly one of --unfreeze"):
        validate(Config(job="compare", model_dir="unused", weights="none"))


@pytest.mark.slow
def test_compare_on_two_replicas_runs_every_mode_with_collective_all_reduces(tiny, pretrained_run, tmp_path):
    """--cpu_replicas=2 all-reduces with collective ops, as GPUs do; a strategy per mode would start its
    collective keys where the previous mode's did, and the second mode's first all-reduce would be matched
    with the first mode's ("Shape mismatch in the collective instance"). A fresh process, as a user runs it."""
    config = tiny(job="compare", weights=pretrained_run, unfreeze=2, cpu_replicas=2, model_dir=str(tmp_path))
    result = launch(*tiny_flags(config))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "compare.md").read_text()
    for mode in ["scratch", "frozen", "finetune", "lora"]:
        assert _row(table, mode).startswith(f"| {mode} | done | "), _row(table, mode)
        assert json.loads((tmp_path / mode / "results.json").read_text())["devices"]["replicas"] == 2


def test_three_hundred_classes_draw_the_most_confused_and_tabulate_per_class_rows():
    """A run's end costs seconds at any class count: 200 classes drew a 20141x19976-pixel confusion.png."""
    from transfer_engine.engine.reports import confusion

    classes = [f"class {k}" for k in range(300)]
    counts = np.diag(np.full(300, 10))
    counts[17, 17], counts[17, 230] = 4, 6  # The one confused pair.
    drawing = confusion.figure(counts, classes, "test")
    width, height = drawing.get_size_inches()
    assert width * height < 30 ** 2, (width, height)  # 25 classes at most, not 300.
    assert "the 25 most confused of 300 classes" in drawing.axes[0].get_title()
    shown = [label.get_text() for label in drawing.axes[0].get_yticklabels()]
    assert len(shown) == 25 and {"class 17", "class 230"} <= set(shown)

    row = {"status": "done", "wall_seconds": 1.0, "class_names": classes,
           "test_class_accuracy": {name: 1.0 for name in classes},
           "test_confusion_matrix": {"classes": classes, "counts": counts.tolist()}}
    config = {"backbone": "small_cnn", "dataset": "folder:x", "weights": "none", "epochs": 1, "batch_size": 8,
              "learning_rate": 0.1, "train_split": "a", "eval_split": "b", "test_split": "c", "unfreeze": 2}
    table = compare.markdown({"modes": {"scratch": row, "frozen": row}, "config": config})
    assert "(300 classes)" in table.splitlines()[0]
    assert "| class | scratch | frozen |" in table and "| class 299 | 1.0000 | 1.0000 |" in table
    assert "| class 17 | class 230 | 6 |" in table
    assert max(len(line) for line in table.splitlines()) < 400  # No line with a column per class.

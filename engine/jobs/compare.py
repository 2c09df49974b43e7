"""`--job=compare`: the tutorials' experiment in one command.

The same task trained from scratch, with the pretrained backbone frozen, fine-tuned (and staged, head
first, when --head_epochs is set) and adapted with LoRA factors, with otherwise identical flags, each in `model_dir/<mode>/` so
TensorBoard shows them side by side (`tensorboard --logdir model_dir`). Then `compare.md` (the table)
and `compare.png` (validation curves). A mode that fails is reported in the table; the others still run.
"""

import json
import os
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from transfer_engine.data import sources
from transfer_engine.engine import config as config_lib
from transfer_engine.engine.reports import figures
from transfer_engine.engine.jobs import training
from transfer_engine.engine.reports.confusion import MAX_DRAWN
from transfer_engine.engine.core.run_dir import RunDir, replace_atomic, write_atomic
from transfer_engine.errors import ModesFailed, RunError, first_line
from transfer_engine.models import modes


def variants(config):
    """{mode name: the train config of that mode, in model_dir/<mode>}, validated before any runs: every
    mode of models/modes.py, staged only with --head_epochs."""
    return {
        name: config_lib.for_mode(config, name, model_dir=os.path.join(config.model_dir, name))
        for name, mode in modes.MODES.items() if config.head_epochs or not mode.head_first
    }


def compare(config):
    """Trains every mode (engine/jobs/training.py), then writes the table and the plot."""
    # Bad data flags would fail every mode alike: they fail once, as one line, before any mode runs.
    source = sources.open_source(config)
    config = sources.with_default_splits(config, source)
    runs = variants(config)
    for name, run in runs.items():
        RunDir(run.model_dir).check_compatible(run)  # Refuse a mixed-up model_dir before hours of work.
    for name in ("train", "eval", "test"):
        if getattr(config, f"{name}_split"):
            source.split(getattr(config, f"{name}_split"), f"{name}_split")
    with RunDir(config.model_dir).lock():  # Two comparisons in one directory would mix their reports.
        return _compare(config, runs)


def _compare(config, runs):
    rows = {}
    for index, (name, run) in enumerate(runs.items(), 1):
        label = f"[{index}/{len(runs)} {name}] "
        logging.info("Compare: mode %d of %d: %s -> %s", index, len(runs), name, run.model_dir)
        started = time.time()
        try:
            rows[name] = {"status": "done", **training.train(run, progress_label=label)}
        # Bad input, divergence, out of memory: reported, and the other modes still run. Anything else
        # is a bug and stops the comparison with its traceback.
        except (RunError, tf.errors.ResourceExhaustedError) as error:
            logging.error("Compare: %s failed: %s", name, first_line(error))
            rows[name] = {"status": f"failed: {first_line(error)}", "wall_seconds": time.time() - started}
        rows[name]["curves"] = _curves(run.model_dir)
        keras.backend.clear_session()  # Frees this mode's model before the next one is built.
    report = {"job": "compare", "modes": rows, "config": _describe(config)}
    os.makedirs(config.model_dir, exist_ok=True)
    write_atomic(os.path.join(config.model_dir, "compare.md"), markdown(report))
    plot(report, os.path.join(config.model_dir, "compare.png"))
    RunDir(config.model_dir).write_json("compare.json", report)
    print(markdown(report))
    failed = [name for name, row in rows.items() if row["status"] != "done"]
    if failed:
        raise ModesFailed(
            f"compare: {', '.join(failed)} failed; the table is in {config.model_dir}/compare.md"
        )
    return report


def _curves(model_dir):
    """Per-epoch metrics of a mode's run (what metrics.jsonl holds, even of a failed run)."""
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _describe(config):
    return {
        "backbone": config.backbone, "alpha": config.alpha, "image_size": config.image_size,
        "weights": config.weights, "dataset": config.dataset, "label_subset": list(config.label_subset),
        "train_split": config.train_split, "eval_split": config.eval_split, "test_split": config.test_split,
        "epochs": config.epochs, "head_epochs": config.head_epochs, "batch_size": config.batch_size,
        "learning_rate": config.learning_rate, "backbone_lr_mult": config.backbone_lr_mult,
        "unfreeze": config.unfreeze or config.unfreeze_from or config.trainable_regex,
        "lora_rank": config.lora_rank,
    }


def _number(value, spec):
    return "-" if value is None else format(value, spec)


def _most_confused(counts, pairs=10):
    """(true, predicted, count) of the `pairs` largest off-diagonal cells of a confusion matrix."""
    counts = np.array(counts)
    np.fill_diagonal(counts, 0)
    cells = np.argsort(-counts, axis=None, kind="stable")[:pairs]
    return [(*divmod(int(cell), len(counts)), int(counts.flat[cell])) for cell in cells if counts.flat[cell]]


def markdown(report):
    """The comparison table, with what was compared above it."""
    described = report["config"]
    done = {name: row for name, row in report["modes"].items() if row["status"] == "done"}
    classes = next((row["class_names"] for row in done.values()), None)
    lines = [
        f"# {described['backbone']} on {described['dataset']}"
        + (f" ({', '.join(classes)})" if classes and len(classes) <= MAX_DRAWN else
           f" ({len(classes):,} classes)" if classes else ""),
        "",
        f"Weights `{described['weights']}`, {described['epochs']} epochs, batch {described['batch_size']}, "
        f"learning rate {described['learning_rate']:g}, train `{described['train_split']}`, "
        f"validation `{described['eval_split']}`, test `{described['test_split']}`; finetune unfreezes "
        f"`{described['unfreeze']}`; lora adds rank-{described.get('lora_rank')} factors.",
        "",
        "| mode | status | train loss | train acc | val loss | val acc | test loss | test acc "
        "| trainable params | frozen params | images/sec | wall time |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, row in report["modes"].items():
        lines.append("| " + " | ".join([
            name, row["status"],
            _number(row.get("train_loss"), ".4f"), _number(row.get("train_accuracy"), ".4f"),
            _number(row.get("eval_loss"), ".4f"), _number(row.get("eval_accuracy"), ".4f"),
            _number(row.get("test_loss"), ".4f"), _number(row.get("test_accuracy"), ".4f"),
            _number(row.get("trainable_params"), ","), _number(row.get("non_trainable_params"), ","),
            _number(row.get("images_per_sec"), ",.0f"), f"{row['wall_seconds']:.0f} s",
        ]) + " |")
    per_class = {name: row["test_class_accuracy"] for name, row in done.items() if row.get("test_class_accuracy")}
    if per_class and len(classes) > MAX_DRAWN:  # A row per class: readable at any class count.
        lines += ["", "Test accuracy per class:", "", "| class | " + " | ".join(per_class) + " |",
                  "| --- |" + " ---: |" * len(per_class)]
        lines += [f"| {c} | " + " | ".join(_number(accuracy[c], ".4f") for accuracy in per_class.values()) + " |"
                  for c in classes]
    elif per_class:
        lines += ["", "Test accuracy per class:", "",
                  "| mode | " + " | ".join(classes) + " |", "| --- |" + " ---: |" * len(classes)]
        lines += [f"| {name} | " + " | ".join(f"{accuracy[c]:.4f}" for c in classes) + " |"
                  for name, accuracy in per_class.items()]
    matrices = {name: row["test_confusion_matrix"]["counts"] for name, row in done.items() if row.get("test_confusion_matrix")}
    if matrices and len(classes) > MAX_DRAWN:
        lines += ["", f"The most confused pairs of the test split (of {len(classes):,} classes; each mode's "
                  "results.json has its whole confusion matrix):"]
        for name, counts in matrices.items():
            lines += ["", f"{name}:", "", "| true | predicted | images |", "| --- | --- | ---: |"]
            lines += [f"| {classes[true]} | {classes[predicted]} | {n:,} |" for true, predicted, n in _most_confused(counts)]
    elif matrices:
        lines += ["", "Test confusion matrices (rows: the true class; columns: the predicted one; each mode's "
                  "confusion.png shows them normalised):"]
        for name, counts in matrices.items():
            lines += ["", f"{name}:", "", "| true \\ predicted | " + " | ".join(classes) + " |",
                      "| --- |" + " ---: |" * len(classes)]
            lines += [f"| {true} | " + " | ".join(f"{n:,}" for n in row) + " |" for true, row in zip(classes, counts)]
    scratch = done.get("scratch", {}).get("test_accuracy")
    if scratch is not None:
        gains = [f"{name} {row['test_accuracy'] - scratch:+.4f}" for name, row in done.items()
                 if name != "scratch" and row.get("test_accuracy") is not None]
        if gains:
            lines += ["", "Test accuracy against scratch: " + ", ".join(gains) + "."]
    return "\n".join(lines) + "\n"


def plot(report, path):
    """Validation accuracy and loss per epoch, one line per mode (matplotlib, no display needed).
    Returns the legend's labels."""
    figure, (accuracy_axes, loss_axes) = figures.new(columns=2, figsize=(11, 4.2))
    described = report["config"]
    figure.suptitle(f"{described['backbone']} on {described['dataset']}: validation per epoch, by mode")
    for name, row in report["modes"].items():
        curve = [point for point in row["curves"] if point.get("eval_loss") is not None]
        label = name if row["status"] == "done" else f"{name} (failed)"
        if not curve:
            accuracy_axes.plot([], [], label=label)  # Still in the legend, so a failure is visible.
            continue
        epochs = [point["epoch"] for point in curve]
        accuracy_axes.plot(epochs, [point["eval_accuracy"] for point in curve], marker="o", ms=3, label=label)
        loss_axes.plot(epochs, [point["eval_loss"] for point in curve], marker="o", ms=3, label=label)
    if described["head_epochs"]:
        for axes in (accuracy_axes, loss_axes):
            axes.axvline(described["head_epochs"] + 0.5, color="gray", ls=":", lw=1)
            axes.text(described["head_epochs"] + 0.6, 0.02, "staged: unfreeze", color="gray",
                      transform=axes.get_xaxis_transform())
    for axes, what in ((accuracy_axes, "validation accuracy"), (loss_axes, "validation loss")):
        axes.set_xlabel("epoch")
        axes.set_ylabel(what)
        axes.set_title(what)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    replace_atomic(path, lambda temporary: figure.savefig(temporary, dpi=110))
    return [text.get_text() for text in accuracy_axes.get_legend().get_texts()]

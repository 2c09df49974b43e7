"""The test split's confusion matrix as a picture: confusion.png in the run directory and an image in
TensorBoard (logs/test). The counts come from the exact distributed evaluation (engine/trainer.py)."""

import numpy as np

from transfer_engine.engine import figures


def figure(counts, class_names, title):
    """Rows normalised to the true class's examples (colour and percentage), with each cell's count."""
    pyplot = figures.pyplot()
    counts = np.asarray(counts)
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    size = 1.6 + 0.9 * len(class_names)
    drawing, axes = pyplot.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    drawing.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in ticks:
        for column in ticks:
            axes.text(column, row, f"{counts[row, column]:,}\n{rates[row, column]:.0%}", ha="center", va="center",
                      fontsize=8, color="white" if rates[row, column] > 0.5 else "black")
    drawing.tight_layout()
    return drawing


def write(run_dir, counts, class_names, *, title, step):
    """confusion.png and the TensorBoard image of the same picture."""
    figures.save(run_dir, figure(counts, class_names, title), "confusion.png", tag="confusion_matrix", step=step)

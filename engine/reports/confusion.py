"""The test split's confusion matrix as a picture: confusion.png in the run directory and an image in
TensorBoard (logs/test). The counts come from the exact distributed evaluation (engine/core/steps.py)."""

import numpy as np

from transfer_engine.engine.reports import figures


MAX_DRAWN = 25  # Classes a picture shows at most (0.9 inch each): 200 took 17 GB and minutes to draw.


def drawn_classes(counts, limit=MAX_DRAWN):
    """The classes to draw, in class order: every one up to `limit`; beyond, those of the largest
    off-diagonal cells (the most confused pairs, both classes of each), then the least accurate."""
    count = len(counts)
    if count <= limit:
        return list(range(count))
    confused = np.array(counts, np.float64)
    np.fill_diagonal(confused, 0)
    chosen = []
    for cell in np.argsort(-confused, axis=None, kind="stable"):
        if confused.flat[cell] == 0 or len(chosen) >= limit:
            break
        chosen += [int(k) for k in divmod(int(cell), count) if k not in chosen][:limit - len(chosen)]
    totals = np.maximum(np.sum(counts, axis=1), 1)
    for k in np.argsort(np.diagonal(counts) / totals, kind="stable"):
        if len(chosen) >= limit:
            break
        if int(k) not in chosen:
            chosen.append(int(k))
    return sorted(chosen)


def figure(counts, class_names, title):
    """Rows normalised to the true class's examples (colour and percentage), with each cell's count; with
    more than MAX_DRAWN classes, the most confused ones (drawn_classes), said in the title."""
    counts = np.asarray(counts)
    class_names = [figures.printable(name) for name in class_names]
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    shown = drawn_classes(counts)
    if len(shown) < len(class_names):
        title = f"{title}\nthe {len(shown)} most confused of {len(class_names):,} classes"
        counts, rates = counts[np.ix_(shown, shown)], rates[np.ix_(shown, shown)]
        class_names = [class_names[k] for k in shown]
    size = 1.6 + 0.9 * len(class_names)
    drawing, axes = figures.new(figsize=(size + 1.5, size))
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    drawing.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(figures.printable(title))
    for row in ticks:
        for column in ticks:
            axes.text(column, row, f"{counts[row, column]:,}\n{rates[row, column]:.0%}", ha="center", va="center",
                      fontsize=8, color="white" if rates[row, column] > 0.5 else "black")
    drawing.tight_layout()
    return drawing


def write(run_dir, counts, class_names, *, title, step):
    """confusion.png and the TensorBoard image of the same picture."""
    figures.save(run_dir, figure(counts, class_names, title), "confusion.png", tag="confusion_matrix", step=step)

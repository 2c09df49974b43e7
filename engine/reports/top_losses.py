"""top_losses.png: the test images the model gets most wrong, as fastai's `plot_top_losses` shows them.

After the test (and `--job=evaluate`), the examples of the test split with the highest loss, each drawn
with its true class, the predicted class and that prediction's probability, and the loss; also an image
in TensorBoard (logs/test). People would rather look at the mistakes than read a count: a mislabelled
photo, a class that needs more examples, an image the pipeline mangled.

The losses come from one inference pass over the split the test evaluated (the cached features where
the run has them, so it costs little), in the model's own inference mode: the logits the calibration
measures too (engine/reports/confidence.py), and the per-example cross-entropy of the evaluation.
"""

import dataclasses
import os

import numpy as np

from transfer_engine.engine.maths import calibration
from transfer_engine.engine.reports import figures

SHOWN = 16  # Pictures drawn: a 4 x 4 grid.


@dataclasses.dataclass(frozen=True)
class Mistake:
    index: int  # In the split, as read (the order of its examples).
    loss: float
    label: int
    predicted: int
    probability: float  # Of the predicted class.


def find(logits, labels, *, shown=SHOWN):
    """The `shown` examples with the highest loss, highest first, from the logits of a split's examples in
    order ([n, classes >= 2]: engine/reports/confidence.py's logits_of) and their labels."""
    logits = np.asarray(logits, np.float64)
    probabilities = calibration.softmax(logits)
    losses = calibration.cross_entropy(logits, labels)
    order = np.lexsort((np.arange(len(losses)), -losses))[:shown]  # Highest loss first; ties: the earlier example.
    return [Mistake(int(i), float(losses[i]), int(labels[i]), int(probabilities[i].argmax()), float(probabilities[i].max()))
            for i in order]


def images(examples, indices):
    """{index: uint8 image} of the examples at `indices` of `examples` (images, as decoded and cached)."""
    wanted, found = set(indices), {}
    for index, (image, _) in enumerate(examples.dataset):
        if index in wanted:
            found[index] = image.numpy()
            if len(found) == len(wanted):
                break
    return found


def figure(mistakes, pictures, class_names, *, names=None, title):
    """A grid of the mistakes' pictures, each titled true / predicted (probability) / loss [/ file]."""
    columns = min(4, max(1, len(mistakes)))
    rows = max(1, -(-len(mistakes) // columns))
    drawing, axes = figures.new(rows=rows, columns=columns, figsize=(3 * columns, 3.8 * rows + 0.4), squeeze=False,
                                layout="constrained")  # Room for each picture's title and the suptitle.
    for axis in axes.flat:
        axis.axis("off")
    for axis, mistake in zip(axes.flat, mistakes):
        picture = pictures[mistake.index]
        axis.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray" if picture.shape[-1] == 1 else None)
        lines = [f"true {class_names[mistake.label]}", f"predicted {class_names[mistake.predicted]} "
                 f"({mistake.probability:.2f})", f"loss {mistake.loss:.2f}"]
        if names:
            lines.append(os.path.basename(names[mistake.index])[:28])
        axis.set_title(figures.printable("\n".join(lines)), fontsize=8, color="black" if mistake.label == mistake.predicted else "darkred")
    drawing.suptitle(figures.printable(title), fontsize=10)
    return drawing


def write(run_dir, *, logits, labels, shown_from, class_names, step, title, names=None):
    """top_losses.png (and its TensorBoard image) of the test split: losses from the `logits` of its
    examples, pictures taken from `shown_from` (the same examples' images, in the same order).
    `names(index)` names an example, when known."""
    mistakes = find(logits, labels)
    if not mistakes:
        return []
    pictures = images(shown_from, [mistake.index for mistake in mistakes])
    labels = {mistake.index: names(mistake.index) for mistake in mistakes} if names else None
    drawing = figure(mistakes, pictures, class_names, names=labels, title=title)
    figures.save(run_dir, drawing, "top_losses.png", tag="top_losses", step=step, dpi=90)
    return mistakes

"""top_losses.png: the test images the model gets most wrong, as fastai's `plot_top_losses` shows them.

After the test (and `--job=evaluate`), the examples of the test split with the highest loss, each drawn
with its true class, the predicted class and that prediction's probability, and the loss; also an image
in TensorBoard (logs/test). People would rather look at the mistakes than read a count: a mislabelled
photo, a class that needs more examples, an image the pipeline mangled.

The losses come from one inference pass over the split the test evaluated (the cached features where
the run has them, so it costs little), in the model's own inference mode, the same per-example loss as
the evaluation (engine/trainer.py).
"""

import dataclasses
import heapq
import os

import numpy as np
import tensorflow as tf

from transfer_engine.engine import figures
from transfer_engine.engine.trainer import flip_averaged, per_example_loss, predicted_class

SHOWN = 16  # Pictures drawn: a 4 x 4 grid.


@dataclasses.dataclass(frozen=True)
class Mistake:
    index: int  # In the split, as read (the order of its examples).
    loss: float
    label: int
    predicted: int
    probability: float  # Of the predicted class.


def find(model, examples, *, batch_size, tta=False, shown=SHOWN):
    """The `shown` examples of `examples` (pipeline.Examples of images, or of cached features with the
    model above the cut) with the highest loss, highest first."""

    def predict(inputs, labels):  # Eagerly: one pass, no trace kept (compare runs it once per mode).
        call = lambda batch: model(batch, training=False)
        logits = tf.cast(flip_averaged(call, inputs) if tta else call(inputs), tf.float32)
        loss, _ = per_example_loss(labels, logits)
        if logits.shape[-1] == 1:
            positive = tf.sigmoid(logits[:, 0])
            probability = tf.where(logits[:, 0] > 0, positive, 1 - positive)
        else:
            probability = tf.reduce_max(tf.nn.softmax(logits), axis=-1)
        return loss, predicted_class(logits, labels.dtype), probability

    worst, index = [], 0
    for inputs, labels in examples.dataset.batch(batch_size):
        loss, predicted, probability = (value.numpy() for value in predict(inputs, labels))
        for row in range(len(loss)):
            mistake = Mistake(index + row, float(loss[row]), int(labels[row]), int(predicted[row]), float(probability[row]))
            heapq.heappush(worst, (mistake.loss, -mistake.index, mistake))
            if len(worst) > shown:
                heapq.heappop(worst)
        index += len(loss)
    return [entry[2] for entry in sorted(worst, reverse=True)]


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


def write(run_dir, *, model, scored, shown_from, class_names, batch_size, step, title, tta=False, names=None):
    """top_losses.png (and its TensorBoard image) of the test split: losses computed on `scored` (its
    images, or its cached features with `model` the part above the cut), pictures taken from `shown_from`
    (the same examples' images, in the same order). `names(index)` names an example, when known."""
    mistakes = find(model, scored, batch_size=batch_size, tta=tta)
    if not mistakes:
        return []
    pictures = images(shown_from, [mistake.index for mistake in mistakes])
    labels = {mistake.index: names(mistake.index) for mistake in mistakes} if names else None
    drawing = figure(mistakes, pictures, class_names, names=labels, title=title)
    figures.save(run_dir, drawing, "top_losses.png", tag="top_losses", step=step, dpi=90)
    return mistakes

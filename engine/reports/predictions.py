"""One pass of the final model over a split: every example's logits, loss and label, kept as arrays.

Everything a finished run reports about a split comes from its one pass (engine/reports/__init__.py): loss,
accuracy, per-class accuracy and the confusion matrix (the numbers engine/core/steps.py's distributed
evaluation sums, from the same per-example losses), top losses, calibration and coverage. The pass is
distributed like the evaluation (every replica and worker, weight-0 padding dropped) and gathered in the
examples' order, so no figure comes from a second pass that could disagree with the first.
"""

import dataclasses

import numpy as np

from transfer_engine.engine.reports.confidence import two_or_more


@dataclasses.dataclass(frozen=True)
class Predictions:
    """A split's pass, in the order of its examples (example i of worker w of n at i x n + w)."""

    name: str  # "eval" or "test"
    split: str  # Its flag's value: test[:100], train[90%:], ...
    examples: object  # This worker's examples of the split, as images (data/pipeline.py's Examples).
    logits: np.ndarray  # [n, classes >= 2], float64: a one-logit (sigmoid) model's z as (0, z).
    losses: np.ndarray  # [n], float64: plain cross-entropy, as the evaluation computes it.
    labels: np.ndarray  # [n], int64.
    positions: np.ndarray  # [n]: example i of worker w of `workers` at i x workers + w, ascending.
    workers: int = 1  # Input pipelines that held the examples.
    worker_index: int = 0  # This process's.

    @property
    def predicted(self):
        return self.logits.argmax(axis=1)

    def own(self):
        """(logits, labels) of this worker's examples, in their order in `examples` (pictures to draw)."""
        mine = self.positions % self.workers == self.worker_index
        return self.logits[mine], self.labels[mine]

    def metrics(self, class_names):
        """{"loss", "accuracy", "examples", "class_accuracy", "confusion_matrix"} as engine/core/steps.py's
        `summarize` gives them for the distributed evaluation."""
        classes, examples = len(class_names), len(self.labels)
        right = self.predicted == self.labels
        counts = np.bincount(self.labels, minlength=classes)
        correct = np.bincount(self.labels, weights=right, minlength=classes)
        confusion = np.zeros((classes, classes), np.int64)
        np.add.at(confusion, (self.labels, self.predicted), 1)
        return {
            "loss": float(self.losses.sum()) / examples if examples else float("nan"),
            "accuracy": float(right.sum()) / examples if examples else float("nan"),
            "examples": examples,
            "class_accuracy": {name: float(correct[k] / counts[k]) if counts[k] else None
                               for k, name in enumerate(class_names)},
            "confusion_matrix": confusion.tolist(),
        }


def in_order(*arrays):
    """The pass's arrays (the positions last), padding (position -1) dropped, in the examples' order: a
    worker's batches are gathered in turn, every worker's after its own (worker 0's examples 0, 2, 4,
    then worker 1's 1, 3, 5)."""
    positions = arrays[-1]
    order = np.argsort(positions, kind="stable")[np.sum(positions < 0):]
    return tuple(array[order] for array in arrays)


def predict(run, trainer, name, *, inputs=None):
    """The pass of `trainer` (the final model's) over the run's split `name` ("eval" or "test"; None
    without it). `inputs` are what the trainer's steps take, if not the split's images: its cached
    features (engine/core/feature_cache.py); the pictures are the images either way."""
    examples = run.splits[name]
    if examples is None:
        return None
    logits, losses, labels, positions = in_order(*trainer.predict(run.eval_dataset(inputs or examples, positions=True)))
    if run.worker.count == 1 and not np.array_equal(positions, np.arange(examples.count)):
        raise AssertionError(f"the pass over {name} lost or repeated examples: {len(positions)} of {examples.count}")
    return Predictions(
        name=name, split=getattr(run.config, f"{name}_split"), examples=examples, logits=two_or_more(logits),
        losses=losses.astype(np.float64), labels=labels.astype(np.int64), positions=positions, workers=run.worker.count,
        worker_index=run.worker.index,
    )

"""What receives gradients: the single place that sets `trainable`, and the audit that checks it held.

Freezing is done by `layer.trainable = False`, never by zeroing gradients: frozen variables are then
absent from the gradient tape and the optimizer, so momentum and weight decay cannot move them. A
BatchNormalization layer with `trainable = False` also runs in inference mode (Keras semantics): it
normalises with its moving statistics and never updates them.
"""

import numpy as np
import keras

from engine.config import ConfigError
from models.classifier import BACKBONE_LAYER


def weighted_layers(backbone):
    """The backbone's layers that own weights, bottom to top: what `--unfreeze=N` counts from the top."""
    return [layer for layer in backbone.layers if layer.weights]


def apply_mode(model, *, mode, unfreeze=0, bn_momentum=None):
    """Sets `trainable` on every layer for the mode; the head always trains.

    scratch: everything trains, BatchNorm included. frozen: the backbone is fixed. finetune: the top
    `unfreeze` layers with weights train, while every backbone BatchNorm stays in inference mode with
    fixed statistics (the Keras transfer-learning guide's advice for fine-tuning).
    `bn_momentum` replaces the momentum of the backbone's BatchNorm layers: keras.applications use
    0.999, whose moving statistics lag far behind the weights in a short run from scratch, so the
    model evaluates at chance while it trains well (the MobileNetV2 tutorial's scratch result).
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    model.trainable = True
    if mode == "frozen":
        backbone.trainable = False
    elif mode == "finetune":
        layers = weighted_layers(backbone)
        if unfreeze > len(layers):
            raise ConfigError(
                "unfreeze", unfreeze, f"the backbone has only {len(layers)} layers with weights"
            )
        for layer in layers[: len(layers) - unfreeze]:
            layer.trainable = False
        for layer in backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False


def slow_batchnorm_momentum(model, total_steps):
    """The momentum of BatchNorm layers that train, if their moving statistics (an average over about
    1/(1-momentum) steps) cannot settle within the run; else None."""
    momenta = [
        layer.momentum for layer in _all_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
    ]
    slow = [momentum for momentum in momenta if total_steps < 5 / (1 - momentum)]
    return max(slow) if slow else None


def parameter_counts(model):
    """(trainable, frozen) parameter counts of the whole model."""
    return _count(model.trainable_weights), _count(model.non_trainable_weights)


def parameter_table(model):
    """Rows (group, trainable params, frozen params) for the backbone, the head and the total."""
    backbone = model.get_layer(BACKBONE_LAYER)
    head = [layer for layer in model.layers if layer is not backbone]
    rows = [("backbone", _count(backbone.trainable_weights), _count(backbone.non_trainable_weights))]
    trained = [layer.name for layer in weighted_layers(backbone) if layer.trainable_weights]
    if trained and len(trained) < len(weighted_layers(backbone)):
        rows.append((f"  trains from {trained[0]}", None, None))
    rows.append((
        "head",
        sum(_count(layer.trainable_weights) for layer in head),
        sum(_count(layer.non_trainable_weights) for layer in head),
    ))
    rows.append(("total", *parameter_counts(model)))
    return rows


def format_table(rows):
    lines = [f"{'group':<34}{'trainable':>12}{'frozen':>12}"]
    for name, trainable, frozen in rows:
        if trainable is None:
            lines.append(name)
        else:
            lines.append(f"{name:<34}{trainable:>12,}{frozen:>12,}")
    return "\n".join(lines)


def frozen_weights(model):
    """Weights that training must leave bitwise unchanged.

    Everything not trainable, except the moving statistics of BatchNorm layers that train (those
    update by design).
    """
    moving = set()
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            moving.update(id(weight) for weight in layer.non_trainable_weights)
    return [weight for weight in model.non_trainable_weights if id(weight) not in moving]


def snapshot(model):
    """A copy of every weight's value, keyed by its path."""
    return {weight.path: np.array(weight.numpy(), copy=True) for weight in model.weights}


def audit(model, before):
    """Counts how many frozen and trainable weights changed since `before` (a `snapshot`).

    Frozen weights are compared bitwise; a frozen weight that changed is a bug, listed by path.
    """
    frozen = frozen_weights(model)
    changed = lambda weights: [w.path for w in weights if not np.array_equal(before[w.path], w.numpy())]
    frozen_changed = changed(frozen)
    return {
        "frozen_variables": len(frozen),
        "frozen_changed": len(frozen_changed),
        "frozen_changed_paths": frozen_changed,
        "trainable_variables": len(model.trainable_weights),
        "trainable_changed": len(changed(model.trainable_weights)),
    }


def _all_layers(layer):
    yield layer
    for sublayer in getattr(layer, "layers", ()):
        yield from _all_layers(sublayer)


def _count(weights):
    return int(sum(np.prod(weight.shape) for weight in weights))

"""What receives gradients: the one resolver that decides it, the table that shows it, the audit that
proves it held.

`apply` turns the mode and one rule into the exact list of variables that train (the optimizer sees no
other) and sets `layer.trainable` to match, which also puts frozen BatchNorm layers in inference mode
(Keras semantics: they normalise with their moving statistics and never update them). Freezing is never
done by zeroing gradients: frozen variables are absent from the gradient tape and the optimizer, so
momentum and weight decay cannot move them.
"""

import dataclasses
import math
import re

import keras
import numpy as np

from transfer_engine.errors import ConfigError
from transfer_engine.models import modes
from transfer_engine.models.classifier import BACKBONE_LAYER

BN = keras.layers.BatchNormalization
# Block prefixes of keras.applications layer names: block_13_ (MobileNetV2), block2a_ (EfficientNet),
# conv4_block3_ (ResNet), expanded_conv_3_ (MobileNetV3), block1_ (small_cnn).
_BLOCK = re.compile(r"^(block_?\d+[a-z]?|conv\d+_block\d+|expanded_conv(_\d+)?)(?=_)")


@dataclasses.dataclass(frozen=True)
class Rule:
    """Which backbone layers `finetune` trains; exactly one field is set (validated in config)."""

    unfreeze: int = 0  # The top N layers that own weights.
    unfreeze_from: str = ""  # This layer and every layer above it.
    regex: str = ""  # Variables whose path (e.g. block_16_project/kernel) matches.

    @classmethod
    def from_config(cls, config):
        return cls(config.unfreeze, config.unfreeze_from, config.trainable_regex)


def weighted_layers(backbone):
    """The backbone's layers that own weights, bottom to top: what `--unfreeze=N` counts from the top."""
    return [layer for layer in backbone.layers if layer.weights]


def apply(model, *, mode, rule=Rule(), bn="frozen", bn_momentum=None, lora_rank=None):
    """Sets `trainable` on every layer and returns the variables that train, head first.

    `mode` names a row of models/modes.py, which says what trains of the backbone: all of it
    (scratch), none (frozen: the head alone), the variables the rule selects (finetune), or LoRA
    factors of rank `lora_rank` beside its kernels (lora; added once, by the first call). Its
    BatchNorm layers train always (scratch), never, or per `bn`: with "frozen" every backbone BatchNorm
    stays in inference mode with fixed parameters and statistics (the Keras transfer-learning guide's
    advice), with "train" BatchNorm layers the rule selects train and update their statistics.
    `bn_momentum` replaces the momentum of the backbone's BatchNorm layers: keras.applications use
    0.999, whose moving statistics lag far behind the weights in a short run from scratch, so the
    model evaluates near chance while it trains well (the MobileNetV2 tutorial's scratch result).
    """
    backbone = model.get_layer(BACKBONE_LAYER)
    for layer in all_layers(model):  # Every layer on, so every candidate variable is visible below.
        layer.trainable = True
    if bn_momentum is not None:
        for layer in backbone.layers:
            if isinstance(layer, BN):
                layer.momentum = bn_momentum
    entry = modes.MODES[mode]
    if entry.backbone_trains == modes.ALL:
        selected = backbone.trainable_weights
    elif entry.backbone_trains == modes.NONE:
        selected = []
    elif entry.backbone_trains == modes.ADAPTERS:
        selected = _adapters(backbone, lora_rank)
    else:
        selected = _select(backbone, rule)
    selected = {id(weight) for weight in selected}
    batchnorm_trains = {modes.ALWAYS: True, modes.NEVER: False, modes.BY_FLAG: bn == "train"}[entry.batchnorm_trains]

    for layer in backbone.layers:
        chosen = any(id(weight) in selected for weight in layer.trainable_weights)
        if isinstance(layer, BN):
            chosen = chosen and batchnorm_trains
        layer.trainable = chosen
    head = [weight for layer in model.layers if layer is not backbone for weight in layer.trainable_weights]
    return head + [weight for weight in backbone.trainable_weights if id(weight) in selected]


def adaptable(backbone):
    """The backbone's layers that take LoRA factors: Keras' Conv2D and Dense (depthwise convolutions do not)."""
    return [layer for layer in backbone.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def _adapters(backbone, rank):
    """The LoRA factors of the backbone's Conv2D and Dense layers, enabled with `rank` where not yet:
    Keras freezes each base kernel and trains kernel + (alpha / rank) A B instead, A He-initialised and B
    zero, so training starts from the pretrained function. Saving merges the factors into the kernel."""
    factors = []
    for layer in adaptable(backbone):
        if not layer.lora_enabled:
            layer.enable_lora(rank)
        factors += [layer.lora_kernel_a, layer.lora_kernel_b]
    return factors


def _select(backbone, rule):
    """The backbone variables a finetune rule names (all layers trainable when called)."""
    layers = backbone.layers
    if rule.unfreeze:
        weighted = weighted_layers(backbone)
        if rule.unfreeze > len(weighted):
            raise ConfigError(
                "unfreeze", rule.unfreeze, f"the backbone has only {len(weighted)} layers with weights"
            )
        return [weight for layer in weighted[len(weighted) - rule.unfreeze:] for weight in layer.trainable_weights]
    if rule.unfreeze_from:
        names = [layer.name for layer in layers]
        if rule.unfreeze_from not in names:
            examples = ", ".join(names[i] for i in (1, len(names) // 2, -1))
            raise ConfigError(
                "unfreeze_from", rule.unfreeze_from, f"no such backbone layer (names look like {examples})"
            )
        start = names.index(rule.unfreeze_from)
        return [weight for layer in layers[start:] for weight in layer.trainable_weights]
    pattern = re.compile(rule.regex)
    matched = [weight for weight in backbone.trainable_weights if pattern.search(weight.path)]
    if not matched:
        example = backbone.trainable_weights[-1].path
        raise ConfigError(
            "trainable_regex", rule.regex, f"matches no backbone variable (paths look like {example})"
        )
    return matched


def frozen_weights(model, trained):
    """Weights that training must leave bitwise unchanged: all but `trained` and the moving
    statistics of BatchNorm layers that train (those update by design)."""
    moving = {
        id(weight)
        for layer in all_layers(model)
        if isinstance(layer, BN) and layer.trainable
        for weight in layer.non_trainable_weights
    }
    trained = {id(weight) for weight in trained}
    return [weight for weight in model.weights if id(weight) not in trained and id(weight) not in moving]


def parameter_counts(model, trained):
    """(trainable, frozen) parameter counts: `trained` against everything else."""
    trainable = _count(trained)
    return trainable, _count(model.weights) - trainable


def parameter_table(model, trained):
    """Rows (group, layers, trainable params, frozen params): backbone blocks bottom to top, the head,
    the total. A group is a block of the architecture (block_13, conv4_block2, ...) or its stem/top."""
    trained = {id(weight) for weight in trained}
    backbone = model.get_layer(BACKBONE_LAYER)
    rows, index, seen_block = [], {}, False
    for layer in weighted_layers(backbone):
        name = _group(layer.name, seen_block)
        seen_block = seen_block or name not in ("stem", "top")
        if name not in index:
            index[name] = len(rows)
            rows.append([name, 0, 0, 0])
        row = rows[index[name]]
        row[1] += 1
        for weight in layer.weights:
            row[2 if id(weight) in trained else 3] += int(np.prod(weight.shape))
    head = [layer for layer in model.layers if layer is not backbone and layer.weights]
    head_weights = [weight for layer in head for weight in layer.weights]
    rows.append(["head", len(head), _count(w for w in head_weights if id(w) in trained),
                 _count(w for w in head_weights if id(w) not in trained)])
    total_trainable = sum(row[2] for row in rows)
    rows.append(["total", sum(row[1] for row in rows), total_trainable, sum(row[3] for row in rows)])
    return [tuple(row) for row in rows]


def format_table(rows):
    lines = [f"{'group':<18}{'layers':>8}{'trainable':>14}{'frozen':>14}"]
    for name, layers, trainable, frozen in rows:
        lines.append(f"{name:<18}{layers:>8}{trainable:>14,}{frozen:>14,}")
    return "\n".join(lines)


def _group(layer_name, after_first_block):
    match = _BLOCK.match(layer_name)
    if match:
        return match.group(1)
    return "top" if after_first_block else "stem"


SETTLING_HORIZONS = 5  # Moving statistics settle after about this many averaging horizons, 1/(1-momentum) steps each.


def slow_batchnorm_momentum(model, total_steps):
    """The momentum of BatchNorm layers that train, if their moving statistics (an average over about
    1/(1-momentum) steps) cannot settle within the run; else None."""
    momenta = [layer.momentum for layer in all_layers(model) if isinstance(layer, BN) and layer.trainable]
    slow = [momentum for momentum in momenta if not settles(momentum, total_steps)]
    return max(slow) if slow else None


def settles(momentum, total_steps):
    """Whether a moving average with this momentum (BatchNorm statistics, --ema's weights) settles within
    `total_steps` updates."""
    return total_steps >= SETTLING_HORIZONS / (1 - momentum)


def settling_momentum(total_steps):
    """The largest momentum, in hundredths, whose moving statistics settle within `total_steps` (0 if none does)."""
    return max(0.0, math.floor(round(100 * (1 - SETTLING_HORIZONS / total_steps), 6)) / 100)


def snapshot(model):
    """A copy of every weight's value, keyed by its path."""
    return {weight.path: np.array(weight.numpy(), copy=True) for weight in model.weights}


def audit(model, before, trained):
    """How many frozen and trained weights changed since `before` (a `snapshot`).

    Frozen weights are compared bitwise; a frozen weight that changed is a bug, listed by path.
    """
    frozen = frozen_weights(model, trained)
    changed = lambda weights: [w.path for w in weights if not np.array_equal(before[w.path], w.numpy())]
    frozen_changed = changed(frozen)
    return {
        "frozen_variables": len(frozen),
        "frozen_changed": len(frozen_changed),
        "frozen_changed_paths": frozen_changed,
        "trainable_variables": len(trained),
        "trainable_changed": len(changed(trained)),
    }


def all_layers(layer):
    """`layer` and every layer nested in it, depth first."""
    yield layer
    for sublayer in getattr(layer, "layers", ()):
        yield from all_layers(sublayer)


def _count(weights):
    return int(sum(np.prod(weight.shape) for weight in weights))

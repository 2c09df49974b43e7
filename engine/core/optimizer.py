"""The optimizer of a run: Keras 3's own, its learning-rate schedule, weight decay, per-variable
learning-rate multipliers (discriminative rates) and the moving average of the weights (--ema)."""

import contextlib
import functools

import keras

from transfer_engine import internals


def learning_rate_schedule(*, learning_rate, schedule, warmup_steps, total_steps, accumulation=1):
    """Keras' own CosineDecay: to 0 over the run for "cosine"; for "constant", its alpha=1 form (no
    decay), which still gives the linear warm-up. `warmup_steps` and `total_steps` count updates, which
    with gradient accumulation are every `accumulation` steps."""
    if schedule == "constant" and not warmup_steps:
        return learning_rate
    cosine = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    return cosine if accumulation == 1 else PerUpdate(cosine, accumulation)


class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule of updates for an optimizer that accumulates gradients: Keras 3.15 calls a schedule
    with the raw iteration count, which counts every accumulation step (not, as its docs say, updates)."""

    def __init__(self, schedule, accumulation):
        self.schedule, self.accumulation = schedule, accumulation

    def __call__(self, step):
        return self.schedule(step // self.accumulation)

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "accumulation": self.accumulation}


def make_optimizer(*, name, learning_rate, weight_decay, precision, variables, lr_multipliers=None,
                   gradient_accumulation_steps=1, ema=0.0):
    """A Keras 3 optimizer built over `variables`: every variable that will ever train in this run, so
    a staged run's later stages keep the optimizer state of earlier ones.

    Weight decay (if any) skips biases and BatchNorm parameters. `lr_multipliers` maps variables (by
    identity) to learning-rate multipliers, which scale their weight decay too (see
    internals.scale_learning_rates). `ema` > 0 keeps Keras' moving average of `variables` with that
    decay, updated after every step (see `averaged_weights`). Call inside `strategy.scope()`, before any step is traced: a
    Keras 3 optimizer built lazily inside a replicated step fails.
    """
    classes = {
        "adam": keras.optimizers.Adam,
        "sgd": functools.partial(keras.optimizers.SGD, momentum=0.9),
        "rmsprop": keras.optimizers.RMSprop,
        "adamw": keras.optimizers.AdamW,
    }
    optimizer = classes[name](
        learning_rate=learning_rate,
        weight_decay=weight_decay if (weight_decay or name == "adamw") else None,
        # Keras' own accumulation: an update every N steps with their mean gradient; its schedule counts updates.
        gradient_accumulation_steps=gradient_accumulation_steps if gradient_accumulation_steps > 1 else None,
        use_ema=bool(ema), ema_momentum=ema or 0.99,
    )
    if weight_decay:
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    inner = optimizer
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(variables)
    if lr_multipliers and any(value != 1.0 for value in lr_multipliers.values()):
        internals.scale_learning_rates(inner, variables, lr_multipliers)
    return optimizer


def _averages(optimizer, variables):
    """(variable, its moving average) for each of `variables` the optimizer (if any) averages (--ema), else []."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # Inside a LossScaleOptimizer.
    if inner is None or not inner.use_ema:
        return []
    return [(variable, internals.moving_average(inner, variable)) for variable in variables]


@contextlib.contextmanager
def averaged_weights(optimizer, variables):
    """Within it, `variables` hold their moving averages (with --ema; else unchanged); after it, their
    own values again. Evaluation runs inside it, so it judges the weights that will be saved."""
    pairs = _averages(optimizer, variables)
    own = [variable.numpy() for variable, _ in pairs]
    use_averaged_weights(optimizer, variables)
    try:
        yield
    finally:
        for (variable, _), value in zip(pairs, own):
            variable.assign(value)


def use_averaged_weights(optimizer, variables):
    """Puts the moving averages (with --ema) into `variables` for good: what the run saves and tests."""
    for variable, average in _averages(optimizer, variables):
        variable.assign(average)

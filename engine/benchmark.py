"""`--job=benchmark`: throughput measured in one process, printed as a markdown table and written to
`model_dir/benchmark.json`.

Per mode (scratch, frozen, finetune with the flags' rule), on the same backbone, data and global batch:
the engine's training images/sec against Keras `model.fit` on the same model (the tutorials' way),
timed in alternating windows so machine noise hits both; frozen mode with the feature cache; the input
pipeline alone against the tutorials' naive one; FLOPs per training image and the GFLOP/s reached,
beside the float32 matmul GFLOP/s of this machine. Every figure is the median of several windows
after warm-up and tracing; comparisons are ratios of figures from this one run.
"""

import json
import os
import statistics
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

import internals
from data import pipeline, sources
from engine import assembly, feature_cache
from engine import config as config_lib
from engine.optimizer import make_optimizer
from engine.trainer import Stages, per_example_loss
from errors import ConfigError
from models import modes

WINDOWS = 5
WINDOW_STEPS = 20  # Training steps per timed window (engine and fit alike).
CACHED_WINDOW_STEPS = 200  # Head-only steps on cached features are much shorter: more of them per window.
FIT_WARMUP_STEPS = 2  # Left out of each fit window: the first call traces, later ones restart.
MODES = tuple(name for name, mode in modes.MODES.items() if not mode.head_first)  # Each a row, scratch first.
CACHED_MODES = tuple(name for name in MODES if modes.MODES[name].feature_cache)  # And a row on features.
EPOCHS = 10  # The run length over which the feature cache's one-time extraction is amortised.
STREAM_EPOCHS = 1000


def median_rate(measure, windows=WINDOWS):
    """The median of `windows` calls of `measure()` (each returns images/sec)."""
    return statistics.median(measure() for _ in range(windows))


def pipeline_rates(config, split, *, batches=100):
    """Images/sec of the input pipeline alone (no model): the engine's training stream with the cache
    in memory and with no cache, and the tutorials' naive form (plain map, no cache, no prefetch)."""
    rows = {}
    for cache in ("memory", "none"):
        started = time.perf_counter()
        examples = pipeline.prepare(
            split, image_size=config.image_size, cache=cache, deterministic=config.deterministic
        )
        prepare_seconds = time.perf_counter() - started
        stream = pipeline.train_dataset(
            examples, batch_size=config.batch_size, batches_per_epoch=examples.count // config.batch_size,
            seed=config.seed, epochs=1, augmentation=config.augment, shuffle_buffer=config.shuffle_buffer,
            deterministic=config.deterministic,
        )
        rows[f"pipeline, cache {cache}"] = {
            "images_per_sec": median_rate(lambda: pipeline.images_per_sec(stream, batches=batches)),
            "first_pass_seconds": prepare_seconds,
        }
    naive = pipeline.naive_dataset(split, image_size=config.image_size, batch_size=config.batch_size)
    rows["pipeline, naive (tutorials)"] = {
        "images_per_sec": median_rate(lambda: pipeline.images_per_sec(naive, batches=batches // 2))
    }
    return rows


def matmul_gflops(size=1024, repeats=10):
    """float32 matmul GFLOP/s on this machine: the practical ceiling of dense math here."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def run():
        total = tf.zeros([size, size])
        for _ in tf.range(repeats):
            total += tf.linalg.matmul(a, b)
        return total

    run()  # Trace.

    def measure():
        started = time.perf_counter()
        run().numpy()
        return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9

    return median_rate(measure)


def training_flops_per_image(model, variables, image_size, channels, batch=4):
    """Floating-point operations of one training step per image: forward, and backward for what
    trains. Counted on the traced graph, over the ops its gradients depend on (what runs), with
    TensorFlow's registered per-op counts (convolutions, matmuls, their gradients, elementwise math);
    depthwise-convolution gradients have none and are counted from their shapes (internals.op_flops)."""

    @tf.function
    def forward_backward(images, labels):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(labels, model(images, training=True))[0])
        return tape.gradient(loss, variables)

    function = forward_backward.get_concrete_function(
        tf.TensorSpec([batch, image_size, image_size, channels], tf.uint8), tf.TensorSpec([batch], tf.int64)
    )
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # The registry's shape helper logs a deprecation warning per call.
    try:
        return sum(internals.op_flops(function.graph, op) for op in _ops_needed(function.outputs)) / batch
    finally:
        logger.setLevel(level)


def _ops_needed(outputs):
    """The ops that `outputs` depend on: the rest of a traced graph is pruned before it runs."""
    needed, pending = set(), [tensor.op for tensor in outputs]
    while pending:
        op = pending.pop()
        if op not in needed:
            needed.add(op)
            pending.extend(tensor.op for tensor in op.inputs)
            pending.extend(op.control_inputs)
    return needed


class _FitTimer(keras.callbacks.Callback):
    """Times a fit window from the end of its warm-up batches to the end of its last batch."""

    def __init__(self, warmup, steps):
        super().__init__()
        self.warmup, self.steps = warmup, steps
        self.started = self.seconds = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == self.warmup - 1:
            self.started = time.perf_counter()
        elif batch == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.started


def _fit_model(run, variables):
    """The engine's model, compiled for Keras fit with the same optimizer, loss and accuracy metric."""
    config, devices, model = run.config, run.devices, run.model
    trainable = {id(variable) for variable in model.trainable_variables}
    if trainable != {id(variable) for variable in variables}:
        raise RuntimeError("model.fit would train other variables than the engine")
    binary = model.output.shape[-1] == 1
    with devices.strategy.scope():
        model.compile(
            optimizer=make_optimizer(
                name=config.optimizer, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                precision=devices.precision, variables=model.trainable_variables,
            ),
            loss=keras.losses.BinaryCrossentropy(from_logits=True) if binary
            else keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=devices.jit_compile,
        )
    return model


def mode_rates(run, trainer):
    """(engine, fit, engine/fit) training images/sec of one mode, in alternating windows; the ratio is
    the median of each adjacent pair's, so a slow spell of the machine hits both sides of it."""
    config = run.config
    iterator = iter(run.train_dataset())
    model = _fit_model(run, trainer.variables)
    fit_data = pipeline.train_dataset(
        run.splits["train"], batch_size=config.batch_size, batches_per_epoch=run.steps_per_epoch, seed=config.seed,
        epochs=1, augmentation=config.augment, shuffle_buffer=config.shuffle_buffer,
        deterministic=config.deterministic,
    ).repeat()
    images = WINDOW_STEPS * config.batch_size
    engine_window = _window(trainer, iterator, WINDOW_STEPS, config)

    def fit_window():
        timer = _FitTimer(FIT_WARMUP_STEPS, WINDOW_STEPS)
        model.fit(fit_data, epochs=1, steps_per_epoch=FIT_WARMUP_STEPS + WINDOW_STEPS, verbose=0,
                  shuffle=False, callbacks=[timer])  # The dataset is shuffled already.
        return images / timer.seconds

    engine, fit = [], []
    for _ in range(WINDOWS):
        engine.append(engine_window())
        fit.append(fit_window())
    ratio = statistics.median(e / f for e, f in zip(engine, fit))
    return statistics.median(engine), statistics.median(fit), ratio


def cached_rate(run):
    """A mode on cached features: (head-training images/sec, extraction seconds)."""
    features = feature_cache.build(run)
    trainer = Stages(run, step_model=features.upper)(0)
    window = _window(trainer, iter(run.train_dataset(features.splits["train"])), CACHED_WINDOW_STEPS, run.config)
    return median_rate(window), features.report["seconds"]


def _window(trainer, iterator, steps, config):
    """A timed window: `steps` engine steps in calls of --steps_per_loop; returns images/sec. The
    first call traces, outside any window."""
    trainer.train_steps(iterator, tf.constant(config.steps_per_loop)).numpy()

    def window():
        started = time.perf_counter()
        for done in range(0, steps, config.steps_per_loop):
            trainer.train_steps(iterator, tf.constant(min(config.steps_per_loop, steps - done))).numpy()
        return steps * config.batch_size / (time.perf_counter() - started)

    return window


def _mode_configs(config):
    """Each mode's train config (models/modes.py) on the training split alone, with a training stream
    long enough for every window (it is read lazily)."""
    return {
        mode: config_lib.for_mode(
            config, mode, eval_split="", test_split="", feature_cache="off", epochs=STREAM_EPOCHS
        )
        for mode in MODES
    }


def benchmark(config):
    """Measures and reports; see the module docstring."""
    source = sources.open_source(config)
    split = source.split(config.train_split, "train_split")
    logging.info("Benchmark: %s %s at %d px, batch %d", config.dataset, config.train_split,
                 config.image_size, config.batch_size)
    rows = {}
    matmul = matmul_gflops()
    for mode, mode_config in _mode_configs(config).items():
        logging.info("Benchmark: %s (engine and model.fit, %d windows of %d steps each)", mode, WINDOWS, WINDOW_STEPS)
        run = assembly.build(mode_config)
        trainer = Stages(run)(0)
        flops = training_flops_per_image(run.model, trainer.variables, config.image_size, source.channels)
        engine, fit, engine_over_fit = mode_rates(run, trainer)
        rows[mode] = {
            "images_per_sec": engine, "fit_images_per_sec": fit, "engine_over_fit": engine_over_fit,
            "training_flops_per_image": flops, "achieved_gflops": flops * engine / 1e9,
            "trainable_params": int(sum(np.prod(v.shape) for v in trainer.variables)),
        }
        if mode in CACHED_MODES:
            head, extract_seconds = cached_rate(run)
            epoch = run.splits["train"].count
            rows[f"{mode}, feature cache"] = {
                "images_per_sec": head, "extraction_seconds": extract_seconds,
                "extraction_images_per_sec": epoch / extract_seconds,
                f"{EPOCHS}_epochs_seconds": extract_seconds + EPOCHS * epoch / head,
                f"{EPOCHS}_epochs_fit_seconds": EPOCHS * epoch / fit,
            }
        keras.backend.clear_session()
    rows.update(pipeline_rates(config, split))
    report = {
        "dataset": config.dataset, "split": config.train_split, "backbone": config.backbone,
        "alpha": config.alpha, "image_size": config.image_size, "batch_size": config.batch_size,
        "unfreeze": config.unfreeze or config.unfreeze_from or config.trainable_regex,
        "devices": f"{run.devices.kind} x {run.devices.num_replicas}, {run.devices.precision}, "
                   f"XLA {'on' if run.devices.jit_compile else 'off'}",
        "matmul_gflops": matmul, "rows": rows, "ratios": ratios(rows, matmul),
    }
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        with open(os.path.join(config.model_dir, "benchmark.json"), "w") as f:
            json.dump(report, f, indent=2)
    except OSError as error:
        raise ConfigError("model_dir", config.model_dir, f"is not writable ({error.strerror})") from None
    print(markdown(report))
    return report


def ratios(rows, matmul):
    """The targets, as ratios of figures measured in this run."""
    fastest = max(rows[mode]["images_per_sec"] for mode in MODES)
    result = {f"engine / fit, {mode}": rows[mode]["engine_over_fit"] for mode in MODES}
    for mode in CACHED_MODES:
        cache = rows[f"{mode}, feature cache"]
        result[f"{mode} with feature cache / fit {mode}, {EPOCHS} epochs with extraction"] = (
            cache[f"{EPOCHS}_epochs_fit_seconds"] / cache[f"{EPOCHS}_epochs_seconds"]
        )
    result["pipeline (cache memory) / fastest mode"] = rows["pipeline, cache memory"]["images_per_sec"] / fastest
    result["pipeline cache memory / naive"] = (
        rows["pipeline, cache memory"]["images_per_sec"] / rows["pipeline, naive (tutorials)"]["images_per_sec"]
    )
    result["scratch GFLOP/s / matmul GFLOP/s"] = rows["scratch"]["achieved_gflops"] / matmul
    for mode in MODES[1:]:
        result[f"{mode} / scratch images/sec"] = rows[mode]["images_per_sec"] / rows["scratch"]["images_per_sec"]
    return result


def markdown(report):
    lines = [
        f"{report['backbone']} (alpha {report['alpha']:g}) at {report['image_size']} px, batch "
        f"{report['batch_size']}, {report['dataset']} {report['split']}; {report['devices']}; "
        f"matmul {report['matmul_gflops']:.1f} GFLOP/s",
        "",
        "| measured | engine images/sec | model.fit images/sec | engine / fit | GFLOP per image | GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        row = report["rows"][mode]
        lines.append(
            f"| {mode} | {row['images_per_sec']:,.0f} | {row['fit_images_per_sec']:,.0f} | "
            f"{row['engine_over_fit']:.2f}x | {row['training_flops_per_image'] / 1e9:.3f} | "
            f"{row['achieved_gflops']:.1f} |"
        )
    for mode in CACHED_MODES:
        cache = report["rows"][f"{mode}, feature cache"]
        lines.append(f"| {mode}, feature cache (head on features) | {cache['images_per_sec']:,.0f} | | | | |")
        lines.append(f"| {mode}, feature extraction, once | {cache['extraction_images_per_sec']:,.0f} | | | | |")
    for name in ("pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)"):
        lines.append(f"| {name} | {report['rows'][name]['images_per_sec']:,.0f} | | | | |")
    lines += ["", "| ratio | measured |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2f}x |" for name, value in report["ratios"].items()]
    return "\n".join(lines)

"""`--job=benchmark`: throughput measured in one process, printed as a markdown table and written to
`model_dir/benchmark.json`.

The anchor is plain Keras `model.fit` as the tutorials write it: a keras.applications model of the same
architecture (same weights, the same layers train), no strategy scope, Keras' default `jit_compile`,
the tutorials' input pipeline (`map` to decode, resize and scale, `shuffle`, `batch`, `prefetch`), the
same batch, optimizer and images. Per mode (scratch, frozen, finetune with the flags' rule), the
engine's training images/sec (live: every layer runs) against it and, to explain the difference,
against `fit` on the engine's own model and input stream; then, for the modes with a feature cache,
the cache's one-time extraction and its training on cached activations, as the time of 10 epochs
against plain `fit`'s; a ResNet50 scratch row; the input pipeline alone; FLOPs per training image and
the GFLOP/s reached, beside the float32 matmul GFLOP/s of this machine.

Every rate is the median of WINDOWS windows after warm-up and tracing, the sides of a comparison
timed in turn (window i of each, then window i + 1 of each), so a slow spell of the shared machine hits
all of them. Each ratio is the median of the windows' ratios, with their min and max.
"""

import json
import os
import statistics
import time

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from transfer_engine import internals
from transfer_engine.data import pipeline, sources
from transfer_engine.engine.core import assembly, feature_cache
from transfer_engine.engine import config as config_lib
from transfer_engine.engine.core.optimizer import make_optimizer
from transfer_engine.engine.core.steps import Stages, per_example_loss
from transfer_engine.errors import ConfigError
from transfer_engine.models import modes
from transfer_engine.models.backbones import BACKBONES
from transfer_engine.models.classifier import BACKBONE_LAYER

WINDOWS = 5
WINDOW_STEPS = 10  # Training steps per timed window (engine and fit alike).
CACHED_WINDOW_STEPS = 100  # Steps on cached activations are much shorter: more of them per window.
EXTRACTION_WINDOW_BATCHES = 10  # Extraction batches (each one training batch) per timed window.
FIT_WARMUP_STEPS = 2  # Left out of each fit window: the first call traces, every call restarts its input.
TUTORIAL_SHUFFLE = 1000  # The tutorials' shuffle buffer.
# Each a row, scratch first. Not lora: the tutorials' plain fit, the anchor, has no LoRA form.
MODES = tuple(name for name, mode in modes.MODES.items() if not mode.head_first and mode.backbone_trains != modes.ADAPTERS)
CACHED_MODES = tuple(name for name in MODES if modes.MODES[name].feature_cache)  # And a row on activations.
EPOCHS = 10  # The run length over which a feature cache's one-time extraction is amortised.
STREAM_EPOCHS = 1000
HEAVY_BACKBONE = "resnet50"  # A scratch row of a backbone with more arithmetic per byte.
HEAVY_WINDOW_STEPS = 2


def windows(*measures, count=None):
    """Calls each of `measures` (each returns images/sec) in turn, `count` times (default WINDOWS):
    a list of rates per measure."""
    rates = [[] for _ in measures]
    for _ in range(count or WINDOWS):
        for rate, measure in zip(rates, measures):
            rate.append(measure())
    return rates


def ratio(values):
    """{median, min, max} of per-window ratios."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


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
            seed=config.seed, epochs=1, augmentation=pipeline.Augmentation.of(config, split.source.num_classes),
            shuffle_buffer=config.shuffle_buffer,
            deterministic=config.deterministic,
        )
        (rates,) = windows(lambda: pipeline.images_per_sec(stream, batches=batches))
        rows[f"pipeline, cache {cache}"] = {"images_per_sec": statistics.median(rates),
                                            "first_pass_seconds": prepare_seconds}
    naive = pipeline.naive_dataset(split, image_size=config.image_size, batch_size=config.batch_size)
    (rates,) = windows(lambda: pipeline.images_per_sec(naive, batches=batches // 2))
    rows["pipeline, naive (tutorials)"] = {"images_per_sec": statistics.median(rates)}
    return rows


def matmul_window(size=1024, repeats=10):
    """A timed window of float32 matmuls (the practical ceiling of dense math on this machine); returns
    GFLOP/s. Traced here, outside any window."""
    a = tf.random.normal([size, size])
    b = tf.random.normal([size, size])

    @tf.function
    def run():
        total = tf.zeros([size, size])
        for _ in tf.range(repeats):
            total += tf.linalg.matmul(a, b)
        return total

    run()  # Trace.

    def window():
        started = time.perf_counter()
        run().numpy()
        return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9

    return window


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

    return _flops(forward_backward.get_concrete_function(
        tf.TensorSpec([batch, image_size, image_size, channels], tf.uint8), tf.TensorSpec([batch], tf.int64)
    ), batch)


def forward_flops_per_image(model, image_size, channels, batch=4):
    """Floating-point operations of one inference forward pass per image, counted as above."""
    forward = tf.function(lambda images: model(images, training=False))
    return _flops(forward.get_concrete_function(
        tf.TensorSpec([batch, image_size, image_size, channels], tf.uint8)), batch)


def _flops(function, batch):
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


def _fit_window(model, data, batch_size):
    """A timed window of `model.fit` on `data` (a repeating dataset); returns images/sec."""

    def window():
        timer = _FitTimer(FIT_WARMUP_STEPS, WINDOW_STEPS)
        model.fit(data, epochs=1, steps_per_epoch=FIT_WARMUP_STEPS + WINDOW_STEPS, verbose=0, callbacks=[timer],
                  shuffle=False)  # Datasets are shuffled by their pipeline; Keras would warn.
        return WINDOW_STEPS * batch_size / timer.seconds

    return window


def _compile(model, run, **options):
    """Compiles `model` for `fit` with the run's optimizer and the engine's loss (from logits: one
    logit is sigmoid, more are softmax); `options` go to `compile` (e.g. jit_compile)."""
    config = run.config
    binary = model.output.shape[-1] == 1
    model.compile(
        optimizer=make_optimizer(name=config.optimizer, learning_rate=config.learning_rate,
                                 weight_decay=config.weight_decay, precision=run.devices.precision,
                                 variables=model.trainable_variables),
        loss=(keras.losses.BinaryCrossentropy(from_logits=True) if binary
              else keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        metrics=["accuracy"], **options,
    )


def tutorial_model(run, variables):
    """The run's classifier as the tutorials build it: keras.applications' backbone (the run's weights
    copied in, the same layers trainable, BatchNorm in inference where the run keeps it so), pooling,
    dropout and a dense layer; compiled with the same optimizer, no strategy, Keras' default jit_compile."""
    config, engine_model = run.config, run.model
    engine_backbone = engine_model.get_layer(BACKBONE_LAYER)
    size = config.image_size
    backbone = BACKBONES[config.backbone].build((size, size, 3), None, config.alpha)
    for ours, theirs in zip(backbone.weights, engine_backbone.weights, strict=True):
        ours.assign(theirs)
    for ours, theirs in zip(backbone.layers, engine_backbone.layers, strict=True):  # Same constructor, same order.
        ours.trainable = theirs.trainable
    inputs = keras.Input((size, size, 3))
    # The tutorials call a frozen or fine-tuned base with training=False; where BatchNorm trains, as here.
    batchnorm_trains = any(isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
                           for layer in backbone.layers)
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs, training=None if batchnorm_trains else False))
    if config.dropout:
        x = keras.layers.Dropout(config.dropout)(x)
    logits = keras.layers.Dense(engine_model.output.shape[-1])
    model = keras.Model(inputs, logits(x))
    logits.set_weights(engine_model.get_layer("logits").get_weights())
    trained = int(sum(np.prod(variable.shape) for variable in variables))
    if int(sum(np.prod(variable.shape) for variable in model.trainable_variables)) != trained:
        raise RuntimeError("the tutorials' model would train other variables than the engine")
    _compile(model, run)  # Keras' default jit_compile.
    return model


def tutorial_dataset(run):
    """The tutorials' input pipeline over the run's training split: decode, resize and scale in a
    `map`, then shuffle, batch and prefetch; repeated so every fit window reads on."""
    config = run.config
    split, channels = run.splits["train"].split, run.source.channels
    preprocess = BACKBONES[config.backbone].preprocess

    def format_example(encoded, label):
        image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
        image = tf.image.resize(image, (config.image_size, config.image_size))
        if channels == 1:
            image = tf.image.grayscale_to_rgb(image)
        return preprocess(image), label

    return (split.source.read(split.name).map(format_example).shuffle(TUTORIAL_SHUFFLE)
            .batch(config.batch_size).prefetch(tf.data.AUTOTUNE).repeat())


def same_model_fit(run, variables):
    """The engine's own model and training stream, compiled for Keras fit under the run's strategy."""
    config, devices, model = run.config, run.devices, run.model
    if {id(variable) for variable in model.trainable_variables} != {id(variable) for variable in variables}:
        raise RuntimeError("model.fit would train other variables than the engine")
    with devices.strategy.scope():
        # Without XLA under several replicas: Keras' fit with jit_compile and loss scaling under MirroredStrategy
        # fails with a merge_call RuntimeError (keras-team/keras#21366).
        _compile(model, run, jit_compile=devices.jit_compile and devices.num_replicas == 1)
    data = pipeline.train_dataset(
        run.splits["train"], batch_size=config.batch_size, batches_per_epoch=run.steps_per_epoch, seed=config.seed,
        epochs=1, augmentation=pipeline.Augmentation.of(config, run.source.num_classes),
        shuffle_buffer=config.shuffle_buffer,
        deterministic=config.deterministic,
    ).repeat()
    return model, data


def _engine_window(trainer, iterator, steps, batch_size, steps_per_loop):
    """A timed window: `steps` engine steps in calls of `steps_per_loop`; returns images/sec. The first
    call traces, outside any window."""
    trainer.train_steps(iterator, tf.constant(steps_per_loop)).numpy()

    def window():
        started = time.perf_counter()
        for done in range(0, steps, steps_per_loop):
            trainer.train_steps(iterator, tf.constant(min(steps_per_loop, steps - done))).numpy()
        return steps * batch_size / (time.perf_counter() - started)

    return window


def _extraction_window(run, cut):
    """A timed window of the feature cache's extraction over the training split; returns images/sec."""
    extractor = feature_cache.Extractor(run, cut.lower)
    stream = iter(())

    def next_batch():
        nonlocal stream
        batch = next(stream, None)
        if batch is None:  # Start the split over.
            stream = extractor.batches(run.splits["train"])
            batch = next(stream)
        return batch

    next_batch()  # Traces.

    def window():
        started, images = time.perf_counter(), 0
        for _ in range(EXTRACTION_WINDOW_BATCHES):
            images += len(next_batch()[1])
        return images / (time.perf_counter() - started)

    return window


def measure_mode(run, source):
    """The rows of one mode: the engine live against plain and same-model fit; with a feature cache,
    its extraction and training on activations against plain fit over EPOCHS epochs."""
    config = run.config
    trainer = Stages(run)(0)
    flops = training_flops_per_image(run.model, trainer.variables, config.image_size, source.channels)
    plain = tutorial_model(run, trainer.variables)
    measures = {
        "engine": _engine_window(trainer, iter(run.train_dataset()), WINDOW_STEPS, config.batch_size,
                                 config.steps_per_loop),
        "plain": _fit_window(plain, tutorial_dataset(run), config.batch_size),
        "same": _fit_window(*same_model_fit(run, trainer.variables), config.batch_size),
    }
    features = feature_cache.build(run) if config.mode in CACHED_MODES else None
    if features is not None:
        cached = Stages(run, step_model=features.upper)(0)
        measures["cache"] = _engine_window(cached, iter(run.train_dataset(features.splits["train"])),
                                           CACHED_WINDOW_STEPS, config.batch_size, config.steps_per_loop)
        measures["extraction"] = _extraction_window(run, features.cut)
    rates = dict(zip(measures, windows(*measures.values())))
    engine, plain_fit = statistics.median(rates["engine"]), statistics.median(rates["plain"])
    rows = {config.mode: {
        "images_per_sec": engine, "plain_fit_images_per_sec": plain_fit,
        "same_model_fit_images_per_sec": statistics.median(rates["same"]),
        "engine_over_plain_fit": ratio([e / p for e, p in zip(rates["engine"], rates["plain"])]),
        "engine_over_same_model_fit": ratio([e / s for e, s in zip(rates["engine"], rates["same"])]),
        "training_flops_per_image": flops, "achieved_gflops": flops * engine / 1e9,
        "trainable_params": int(sum(np.prod(v.shape) for v in trainer.variables)),
    }}
    if features is not None:
        cut, epoch = features.cut, run.splits["train"].count
        seconds = [epoch / extraction + EPOCHS * epoch / cache
                   for extraction, cache in zip(rates["extraction"], rates["cache"])]
        fit_seconds = [EPOCHS * epoch / rate for rate in rates["plain"]]
        whole = forward_flops_per_image(run.model, config.image_size, source.channels)
        rows[f"{config.mode}, feature cache"] = {
            "cut": cut.layer, "images_per_sec": statistics.median(rates["cache"]),
            "extraction_images_per_sec": statistics.median(rates["extraction"]),
            "forward_flops_below_cut": forward_flops_per_image(cut.lower, config.image_size, source.channels) / whole,
            f"{EPOCHS}_epochs_seconds": statistics.median(seconds),
            f"{EPOCHS}_epochs_plain_fit_seconds": statistics.median(fit_seconds),
            "over_plain_fit": ratio([fit / ours for fit, ours in zip(fit_seconds, seconds)]),
        }
    return rows


def heavy_row(config, source):
    """ResNet50 (random weights) trained from scratch by the engine: its GFLOP/s, in windows alternated
    with the matmul's (a slow spell of the machine then weighs on both sides of their ratio)."""
    run = assembly.build(config_lib.for_mode(
        config, "scratch", backbone=HEAVY_BACKBONE, alpha=1.0, eval_split="", test_split="",
        feature_cache="off", epochs=STREAM_EPOCHS,
    ))
    trainer = Stages(run)(0)
    flops = training_flops_per_image(run.model, trainer.variables, config.image_size, source.channels)
    rates, matmuls = windows(
        _engine_window(trainer, iter(run.train_dataset()), HEAVY_WINDOW_STEPS, config.batch_size,
                       min(config.steps_per_loop, HEAVY_WINDOW_STEPS)),
        matmul_window(),
    )
    rate = statistics.median(rates)
    return {"images_per_sec": rate, "training_flops_per_image": flops, "achieved_gflops": flops * rate / 1e9,
            "gflops_windows": [flops * r / 1e9 for r in rates], "matmul_gflops_windows": matmuls}


def _mode_configs(config):
    """Each mode's train config (models/modes.py) on the training split alone, with a training stream
    long enough for every window (it is read lazily); caches are built by the benchmark itself."""
    return {
        mode: config_lib.for_mode(
            config, mode, eval_split="", test_split="", feature_cache="off", epochs=STREAM_EPOCHS
        )
        for mode in MODES
    }


def benchmark(config):
    """Measures and reports; see the module docstring."""
    source = sources.open_source(config)
    config = sources.with_default_splits(config, source)
    split = source.split(config.train_split, "train_split")
    logging.info("Benchmark: %s %s at %d px, batch %d", config.dataset, config.train_split,
                 config.image_size, config.batch_size)
    rows = {}
    for mode, mode_config in _mode_configs(config).items():
        logging.info("Benchmark: %s (engine, plain fit, same-model fit%s; %d windows of %d steps each)", mode,
                     ", feature cache" if mode in CACHED_MODES else "", WINDOWS, WINDOW_STEPS)
        run = assembly.build(mode_config)
        rows.update(measure_mode(run, source))
        keras.backend.clear_session()
    logging.info("Benchmark: %s scratch (%d windows of %d steps)", HEAVY_BACKBONE, WINDOWS, HEAVY_WINDOW_STEPS)
    rows[f"{HEAVY_BACKBONE} scratch"] = heavy_row(config, source)
    matmul = statistics.median(rows[f"{HEAVY_BACKBONE} scratch"]["matmul_gflops_windows"])
    keras.backend.clear_session()
    rows.update(pipeline_rates(config, split))
    report = {
        "dataset": config.dataset, "split": config.train_split, "backbone": config.backbone,
        "alpha": config.alpha, "image_size": config.image_size, "batch_size": config.batch_size,
        "unfreeze": config.unfreeze or config.unfreeze_from or config.trainable_regex,
        "replicas": run.devices.num_replicas,  # The engine's and same-model fit's; plain fit runs on one device.
        "devices": f"{run.devices.kind} x {run.devices.num_replicas}, {run.devices.strategy_name}, "
                   f"{run.devices.precision}, XLA {'on' if run.devices.jit_compile else 'off'}, "
                   f"oneDNN {'on' if run.devices.onednn else 'off'}",
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
    """The targets, as ratios of figures measured in this run: {name: {median, min, max}}."""
    fastest = max(rows[mode]["images_per_sec"] for mode in MODES)
    result = {f"engine / plain fit, {mode}": rows[mode]["engine_over_plain_fit"] for mode in MODES}
    result.update({f"engine / fit on the same model, {mode}": rows[mode]["engine_over_same_model_fit"]
                   for mode in MODES})
    for mode in CACHED_MODES:
        if f"{mode}, feature cache" in rows:
            result[f"{mode} with feature cache / plain fit {mode}, {EPOCHS} epochs with extraction"] = (
                rows[f"{mode}, feature cache"]["over_plain_fit"])
    exact = lambda value: {"median": value, "min": value, "max": value}  # Single figures.
    result["pipeline (cache memory) / fastest mode"] = exact(
        rows["pipeline, cache memory"]["images_per_sec"] / fastest)
    result["pipeline cache memory / naive"] = exact(
        rows["pipeline, cache memory"]["images_per_sec"] / rows["pipeline, naive (tutorials)"]["images_per_sec"])
    result["scratch GFLOP/s / matmul GFLOP/s"] = exact(rows["scratch"]["achieved_gflops"] / matmul)
    heavy = rows[f"{HEAVY_BACKBONE} scratch"]
    result[f"{HEAVY_BACKBONE} scratch GFLOP/s / matmul GFLOP/s"] = ratio(
        [value / peak for value, peak in zip(heavy["gflops_windows"], heavy["matmul_gflops_windows"])])
    for mode in MODES[1:]:
        result[f"{mode} / scratch images/sec"] = exact(
            rows[mode]["images_per_sec"] / rows["scratch"]["images_per_sec"])
    return result


def _on(replicas):
    return "one device" if replicas == 1 else f"{replicas} replicas"


def markdown(report):
    rows = report["rows"]
    lines = [
        f"{report['backbone']} (alpha {report['alpha']:g}) at {report['image_size']} px, batch "
        f"{report['batch_size']}, {report['dataset']} {report['split']}; {report['devices']}; "
        f"matmul {report['matmul_gflops']:.1f} GFLOP/s",
        "",
        f"| measured | engine images/sec ({_on(report['replicas'])}) | plain fit images/sec (one device) | "
        f"engine / plain fit | fit on the same model images/sec ({_on(report['replicas'])}) | GFLOP per image | "
        "GFLOP/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in MODES:
        row = rows[mode]
        lines.append(
            f"| {mode} | {row['images_per_sec']:,.0f} | {row['plain_fit_images_per_sec']:,.0f} | "
            f"{row['engine_over_plain_fit']['median']:.2f}x | {row['same_model_fit_images_per_sec']:,.0f} | "
            f"{row['training_flops_per_image'] / 1e9:.3f} | {row['achieved_gflops']:.1f} |"
        )
    for mode in CACHED_MODES:
        if f"{mode}, feature cache" in rows:
            cache = rows[f"{mode}, feature cache"]
            lines.append(f"| {mode}, feature cache (above {cache['cut']}, on its activations) | "
                         f"{cache['images_per_sec']:,.0f} | | | | | |")
            lines.append(f"| {mode}, feature extraction, once ({cache['forward_flops_below_cut']:.0%} of the "
                         f"forward FLOPs) | {cache['extraction_images_per_sec']:,.0f} | | | | | |")
    heavy = rows[f"{HEAVY_BACKBONE} scratch"]
    lines.append(f"| {HEAVY_BACKBONE} scratch | {heavy['images_per_sec']:,.1f} | | | | "
                 f"{heavy['training_flops_per_image'] / 1e9:.3f} | {heavy['achieved_gflops']:.1f} |")
    for name in ("pipeline, cache memory", "pipeline, cache none", "pipeline, naive (tutorials)"):
        lines.append(f"| {name} | {rows[name]['images_per_sec']:,.0f} | | | | | |")
    lines += ["", "| ratio | median | min | max |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {value['median']:.2f}x | {value['min']:.2f}x | {value['max']:.2f}x |"
              for name, value in report["ratios"].items()]
    return "\n".join(lines)

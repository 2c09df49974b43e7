"""`--job=benchmark`: throughput measured in one process, printed as a markdown table and written to
`model_dir/benchmark.json`.

Timings on a shared machine are noisy, so every figure is the median of several timed windows after a
warm-up, and comparisons are ratios of figures measured in the same run.
"""

import json
import os
import statistics
import time

from absl import logging

from data import pipeline, sources
from engine.config import ConfigError

WINDOWS = 3


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


def benchmark(config):
    """Measures and reports; see the module docstring."""
    source = sources.open_source(config)
    split = source.split(config.train_split, "train_split")
    logging.info("Benchmark: %s %s at %d px, batch %d", config.dataset, config.train_split,
                 config.image_size, config.batch_size)
    rows = pipeline_rates(config, split)
    report = {
        "dataset": config.dataset, "split": config.train_split, "image_size": config.image_size,
        "batch_size": config.batch_size, "rows": rows,
    }
    table = ["| measured | images/sec |", "| --- | --- |"]
    table += [f"| {name} | {row['images_per_sec']:,.0f} |" for name, row in rows.items()]
    naive = rows["pipeline, naive (tutorials)"]["images_per_sec"]
    for cache in ("memory", "none"):
        ratio = rows[f"pipeline, cache {cache}"]["images_per_sec"] / naive
        table.append(f"| pipeline cache {cache} / naive | {ratio:.1f}x |")
    try:
        os.makedirs(config.model_dir, exist_ok=True)
        with open(os.path.join(config.model_dir, "benchmark.json"), "w") as f:
            json.dump(report, f, indent=2)
    except OSError as error:
        raise ConfigError("model_dir", config.model_dir, f"is not writable ({error.strerror})") from None
    print("\n".join(table))
    return report

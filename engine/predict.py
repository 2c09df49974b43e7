"""`--job=predict`: a trained run's model.keras on image files, folders and globs -> a CSV of top classes.

Images are decoded as the training pipeline decodes them (data/pipeline.py: any JPEG, PNG, BMP or GIF
first frame, converted to the run's channel count and resized to its --image_size), so a prediction
sees what evaluation saw. Files that do not decode are counted and named, never fatal.
"""

import csv
import glob
import io
import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf
import tqdm

from data import pipeline
from data.sources import files_below, is_image
from engine import distribute
from engine.export import load_model
from engine.run_dir import RunDir, write_atomic
from engine.trainer import flip_averaged
from errors import ConfigError, named



def predict(config):
    """Writes one CSV row per readable image: path, top class and probability, then --top_k - 1 more."""
    run_dir = RunDir(config.model_dir)
    class_names = run_dir.read_json("results.json").get("class_names")
    paths = find_images(config.inputs)
    output = config.output or run_dir.file("predictions.csv")
    devices = distribute.configure(config)
    with devices.strategy.scope():
        model = load_model(run_dir)
    class_names = class_names or [str(k) for k in range(max(2, model.output.shape[-1]))]  # Older runs.
    top_k = min(config.top_k, len(class_names))

    indexed = tf.data.Dataset.from_tensor_slices((np.arange(len(paths)), paths)).map(
        lambda index, path: (index, pipeline.decode(
            tf.io.read_file(path), image_size=config.image_size, channels=model.input.shape[-1])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).ignore_errors()
    batches = devices.strategy.experimental_distribute_dataset(indexed.batch(config.batch_size).prefetch(2))

    @tf.function
    def probabilities(images):
        call = lambda batch: model(batch, training=False)
        logits = flip_averaged(call, images) if config.tta else call(images)
        return keras.ops.sigmoid(logits) if logits.shape[-1] == 1 else keras.ops.softmax(logits)

    rows = []
    with tqdm.tqdm(total=len(paths), unit="img", desc="predict", leave=False) as bar:
        for indices, images in batches:
            indices = devices.strategy.gather(indices, axis=0).numpy()
            probs = devices.strategy.gather(devices.strategy.run(probabilities, (images,)), axis=0).numpy()
            if probs.shape[-1] == 1:  # One sigmoid unit: the probability of class 1.
                probs = np.concatenate([1 - probs, probs], axis=-1)
            for index, p in zip(indices, probs):
                top = np.argsort(-p, kind="stable")[:top_k]
                rows.append((index, [paths[index]] + [x for k in top for x in (class_names[k], f"{p[k]:.6f}")]))
            bar.update(len(indices))
    read = {int(index) for index, _ in rows}
    unreadable = [path for index, path in enumerate(paths) if index not in read]
    if unreadable:
        logging.warning(
            "%d of %d files could not be read as images, skipped: %s", len(unreadable), len(paths), named(unreadable),
        )
    header = ["path", "label", "probability"] + [
        name for k in range(2, top_k + 1) for name in (f"label_{k}", f"probability_{k}")
    ]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header] + [row for _, row in sorted(rows)])
    try:
        write_atomic(output, text.getvalue())
    except OSError as error:
        raise ConfigError("output", output, f"cannot be written ({error.strerror})") from None
    logging.info("Predicted %d images: %s", len(rows), output)
    return {"job": "predict", "output": output, "predicted": len(rows), "unreadable": unreadable}


def find_images(inputs):
    """Files named by --inputs: files as given, folders searched recursively for image extensions (skipping
    hidden names, as a folder dataset does), globs expanded (recursively with **); in the order given, each
    file once."""
    found = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        for match in matches:
            if os.path.isdir(match):
                found += sorted(path for path in files_below(match) if is_image(path))
            elif os.path.isfile(match):
                found.append(match)
    found = list(dict.fromkeys(found))
    if not found:
        raise ConfigError("inputs", inputs, "no image file found")
    return found

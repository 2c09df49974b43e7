"""`--job=predict`: a trained run's model.keras on image files, folders and globs -> a CSV of top classes,
with the probabilities calibrated by the run's temperature (engine/reports/confidence.py) and, below
--min_confidence, the answer `unknown` (the top class then in a last column, top_class).

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
from tqdm.auto import tqdm

from transfer_engine.data import pipeline
from transfer_engine.data.sources import files_below, is_image
from transfer_engine.engine.core import distribute
from transfer_engine.engine.jobs.export import load_model
from transfer_engine.engine.core.run_dir import RunDir, write_atomic
from transfer_engine.engine.core.steps import flip_averaged
from transfer_engine.errors import ConfigError, named



def predict(config):
    """Writes one CSV row per readable image of --inputs: path, top class and probability, then --top_k - 1
    more. Returns the job's summary, with "predictions": per image read, its path, classes and probabilities."""
    if not config.inputs:
        raise ConfigError("inputs", "", "--job=predict needs images: files, folders or globs")
    paths = find_images(config.inputs)
    output = config.output or RunDir(config.model_dir).file("predictions.csv")
    images = tf.data.Dataset.from_tensor_slices(np.array([os.fsencode(path) for path in paths], object)).map(
        lambda path: tf.io.read_file(path), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    found = top_classes(config, images, len(paths), decode=pipeline.decode)
    unreadable = [path for index, path in enumerate(paths) if index not in found]
    if not found:  # Before anything is written: an earlier predictions.csv stays.
        raise ConfigError("inputs", config.inputs, f"none of the {len(paths)} files decodes as an image: {named(paths)}")
    if unreadable:
        logging.warning(
            "%d of %d files could not be read as images (or are above --max_image_pixels=%d), skipped: %s",
            len(unreadable), len(paths), config.max_image_pixels, named(unreadable),
        )
    top_k = min(config.top_k, max((len(classes) for classes, _ in found.values()), default=1))
    header = ["path", "label", "probability"] + [
        name for k in range(2, top_k + 1) for name in (f"label_{k}", f"probability_{k}")
    ]
    answers = {index: answer(classes, probabilities, config.min_confidence)
               for index, (classes, probabilities) in found.items()}
    rows = [[paths[index], answers[index]] + [x for name, p in zip(*found[index]) for x in (name, f"{p:.6f}")][1:]
            for index in sorted(found)]
    if config.min_confidence:
        header.append("top_class")
        rows = [row + [found[index][0][0]] for row, index in zip(rows, sorted(found))]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header] + rows)
    try:
        write_atomic(output, text.getvalue())
    except OSError as error:
        raise ConfigError("output", output, f"cannot be written ({error.strerror})") from None
    unknown = sum(answer == UNKNOWN for answer in answers.values())
    logging.info("Predicted %d images%s: %s", len(rows), f", {unknown} unknown (top class below --min_confidence="
                 f"{config.min_confidence:g})" if config.min_confidence else "", output)
    predictions = [{"path": paths[index], "answer": answers[index], "classes": found[index][0],
                    "probabilities": found[index][1]} for index in sorted(found)]
    return {"job": "predict", "output": output, "predicted": len(rows), "unreadable": unreadable,
            "predictions": predictions}


UNKNOWN = "unknown"


def answer(classes, probabilities, min_confidence):
    """The top class, or `unknown` when its probability is below `min_confidence`."""
    return classes[0] if probabilities[0] >= min_confidence else UNKNOWN


def top_classes(config, images, count, *, decode):
    """{index: (top --top_k class names, their probabilities)} of the `count` elements of `images` (a
    dataset) that `decode(element, image_size=, channels=)` turns into an image, by the run's model.keras
    (--tta: with mirror images), calibrated by the run's temperature. Elements that fail to decode are left
    out."""
    run_dir = RunDir(config.model_dir)
    run_dir.refuse_if_training("predict")
    results = run_dir.read_json("results.json")
    class_names = results.get("class_names")
    temperature = (results.get("calibration") or {}).get("temperature", 1.0)  # 1: a run without an eval split.
    devices = distribute.configure(config)
    with devices.strategy.scope():
        model = load_model(run_dir)
    class_names = class_names or [str(k) for k in range(max(2, model.output.shape[-1]))]  # Older runs.
    top_k = min(config.top_k, len(class_names))
    channels = model.input.shape[-1]
    indexed = tf.data.Dataset.zip(tf.data.Dataset.range(count), images).map(
        lambda index, element: (index, decode(element, image_size=config.image_size, channels=channels,
                                              max_pixels=config.max_image_pixels)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    ).ignore_errors()
    batches = devices.strategy.experimental_distribute_dataset(indexed.batch(config.batch_size).prefetch(2))

    @tf.function
    def probabilities(images):
        call = lambda batch: model(batch, training=False)
        logits = (flip_averaged(call, images) if config.tta else call(images)) / temperature
        return keras.ops.sigmoid(logits) if logits.shape[-1] == 1 else keras.ops.softmax(logits)

    found = {}
    with tqdm(total=count, unit="img", desc="predict", leave=False) as bar:
        for indices, batch in batches:
            indices = devices.strategy.gather(indices, axis=0).numpy()
            probs = devices.strategy.gather(devices.strategy.run(probabilities, (batch,)), axis=0).numpy()
            if probs.shape[-1] == 1:  # One sigmoid unit: the probability of class 1.
                probs = np.concatenate([1 - probs, probs], axis=-1)
            for index, p in zip(indices, probs):
                top = np.argsort(-p, kind="stable")[:top_k]
                found[int(index)] = ([class_names[k] for k in top], [float(p[k]) for k in top])
            bar.update(len(indices))
    return found


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

"""`--job=export`: the run's model.keras as artifacts that run without this project, each checked against
the Keras model on the run's test split (the parity report, export.json).

    saved_model   RUN/saved_model/      TF Serving: `serve`, uint8 images of any size, 1 to 4 channels -> logits
    litert        RUN/model.tflite      LiteRT float32: uint8 images at --image_size -> logits
    litert_int8   RUN/model_int8.tflite LiteRT full-integer, calibrated on CALIBRATION_IMAGES images of
                                        the train split; uint8 images at --image_size -> float logits

Every artifact returns the model's logits; export.json records the run's temperature (engine/reports/confidence.py):
calibrated probabilities are softmax(logits / temperature). Every artifact runs the model in inference mode (BatchNorm on its moving statistics, no dropout). Keras
writes all three (`ExportArchive`, `Model.export(format="litert")` with TensorFlow's TFLite converter);
the LiteRT files are run here by the LiteRT interpreter (package ai-edge-litert), as a phone runs them,
and carry TFLite metadata (labels) written with MediaPipe's writer, checked in MediaPipe Tasks'
ImageClassifier when mediapipe is installed (the `.[mediapipe]` extra).

The report also compares each class's accuracy with the artifact to the Keras model's: int8 quantization
can break a few classes while overall agreement stays high (tensorflow/tensorflow#23352). A class that
loses more than --max_class_drop points is named in a warning; the export still succeeds.
"""

import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from transfer_engine.data import pipeline, sources
from transfer_engine.engine.core.run_dir import RunDir, replace_atomic
from transfer_engine.errors import ConfigError, RunError
from transfer_engine import internals

CALIBRATION_IMAGES = 300
# A float artifact computes what the Keras model computes, in another order: its logits may differ by
# rounding only. Relative to the largest logit; the BatchNorm-in-training bug this guards against
# measured 2.18 on logits of about 5.
FLOAT_TOLERANCE = 1e-4
FILES = {"saved_model": "saved_model", "litert": "model.tflite", "litert_int8": "model_int8.tflite"}
CLASSES_NAMED = 5  # A class-drop warning names the worst this many, then counts the rest.


class ExportMismatch(RunError):
    """A float artifact computes other logits than the Keras model it was exported from."""


def export(config):
    """Writes each --export_format artifact of the run in --model_dir and its parity report."""
    run_dir = RunDir(config.model_dir)
    run_dir.refuse_if_training("export")
    model = load_model(run_dir)
    source = sources.open_source(config)
    config = sources.with_default_splits(config, source)  # A hand-written flags.txt may leave them open.
    results = run_dir.read_json("results.json")
    class_names = results.get("class_names") or list(source.class_names)
    artifacts = {}
    for name in config.export_format:
        path = run_dir.file(FILES[name])
        WRITERS[name](model, path, config=config, source=source, class_names=class_names)
        artifacts[name] = path
        logging.info("Exported %s: %s (%s bytes)", name, path, f"{size_of(path):,}")
    report = parity(model, artifacts, config=config, source=source, class_names=class_names)
    # The artifacts return logits, the Keras model's exactly (the parity above): calibrated probabilities
    # are softmax(logits / temperature), as --job=predict computes them (engine/reports/confidence.py).
    report["temperature"] = (results.get("calibration") or {}).get("temperature", 1.0)
    run_dir.write_json("export.json", report)
    logging.info("Parity on %s (%d images):\n%s", config.test_split, report["test_examples"], format_table(report))
    for row in report["artifacts"]:
        if row["class_drops"]:
            logging.warning("%s", drop_warning(row, config.max_class_drop))
    failed = [row for row in report["artifacts"] if row["within_rounding"] is False]
    if failed:
        row = failed[0]
        raise ExportMismatch(
            f"{row['format']} ({row['path']}) differs from the Keras model by up to {row['max_logit_diff']:.3g} "
            f"in a logit (rounding allows {row['tolerance']:.3g}): the artifact does not compute what "
            "was trained; see export.json"
        )
    return report


def load_model(run_dir):
    path = run_dir.file("model.keras")
    if not os.path.exists(path):
        raise ConfigError("model_dir", run_dir.path, "has no model.keras (train it first)")
    return keras.saving.load_model(path, compile=False)


def input_spec(model, image_size=None):
    """uint8 images, any batch; any height and width unless `image_size` fixes them."""
    channels = model.input.shape[-1]
    return tf.TensorSpec([None, image_size, image_size, channels], tf.uint8, name="image")


def write_saved_model(model, path, **_):
    """`serve`: uint8 images of any size and 1 to 4 channels (gray, gray+alpha, RGB, RGBA), converted to the
    model's as training converts them (data/pipeline.to_channels), -> logits."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    channels = model.input.shape[-1]
    archive.add_endpoint("serve", lambda images: model(pipeline.to_channels(images, channels), training=False),
                         input_signature=[tf.TensorSpec([None, None, None, None], tf.uint8, name="image")])
    replace_atomic(path, lambda temporary: archive.write_out(temporary, verbose=False))


def write_litert(model, path, *, config, class_names, **_):
    _litert(model, path, config.image_size)
    write_metadata(path, class_names)


def write_litert_int8(model, path, *, config, source, class_names):
    """Full-integer quantization: int8 weights and activations, calibrated on the first
    CALIBRATION_IMAGES decodable images of the train split; takes uint8 pixels, returns float logits."""
    split = source.split(config.train_split, "train_split")
    images = pipeline.decoded(split, image_size=config.image_size, max_pixels=config.max_image_pixels).take(CALIBRATION_IMAGES)

    def calibration():
        for image, _ in images.batch(1):
            yield [image]

    _litert(
        model, path, config.image_size, optimizations=[tf.lite.Optimize.DEFAULT], representative_dataset=calibration,
        target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        inference_input_type=tf.uint8, inference_output_type=tf.float32,
    )
    write_metadata(path, class_names)


def write_metadata(path, class_names):
    """Embeds TFLite metadata in a LiteRT file with MediaPipe's own writer: the class labels, and the input
    as raw uint8 pixels (mean 0, std 1: the model normalises them itself), so MediaPipe Tasks'
    ImageClassifier runs the file as it is. Without mediapipe installed (the `.[mediapipe]` extra), the
    file has none (said once in the log)."""
    modules = internals.mediapipe_metadata_writer()
    if modules is None:
        logging.warning("%s has no TFLite metadata (labels): install mediapipe (pip install \".[mediapipe]\") to "
                        "embed it for MediaPipe Tasks", path)
        return
    image_classifier, metadata_writer = modules
    with open(path, "rb") as f:
        model = f.read()
    writer = image_classifier.MetadataWriter.create(
        model, input_norm_mean=[0.0], input_norm_std=[1.0], labels=metadata_writer.Labels().add(list(class_names)))
    populated, _ = writer.populate()
    del writer  # Its temporary folder goes now, not at interpreter exit (where its cleanup fails).

    def write(temporary):
        with open(temporary, "wb") as f:
            f.write(populated)

    replace_atomic(path, write)


def _litert(model, path, image_size, **converter_options):
    """Keras' LiteRT export (TensorFlow's TFLite converter; `converter_options` set its attributes) of
    the model in inference mode, for uint8 images at `image_size`."""
    with internals.quiet_native_info():
        replace_atomic(path, lambda temporary: model.export(
            temporary, format="litert", verbose=False, input_signature=[input_spec(model, image_size)],
            **converter_options,
        ))


WRITERS = {"saved_model": write_saved_model, "litert": write_litert, "litert_int8": write_litert_int8}


def size_of(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def runner(name, path):
    """A function: uint8 images [n, size, size, channels] -> float32 logits [n, units], running the
    artifact as its users will (TensorFlow for the SavedModel, the LiteRT interpreter for .tflite)."""
    if name == "saved_model":
        loaded = tf.saved_model.load(path)  # Its variables live as long as it does.
        return lambda images: loaded.serve(tf.constant(images)).numpy()
    from ai_edge_litert.interpreter import Interpreter  # Only export needs it.

    interpreter = Interpreter(model_path=path)
    with internals.quiet_native_info():
        interpreter.allocate_tensors()
    (input_detail,), (output_detail,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = [None]

    def run(images):
        if shape[0] != images.shape:
            interpreter.resize_tensor_input(input_detail["index"], images.shape)
            interpreter.allocate_tensors()
            shape[0] = images.shape
        interpreter.set_tensor(input_detail["index"], images)
        interpreter.invoke()
        return interpreter.get_tensor(output_detail["index"]).astype(np.float32)

    return run


def mediapipe_classifier(path, model):
    """(function: one uint8 image [size, size, 3] -> the top class index by MediaPipe Tasks' ImageClassifier
    running the LiteRT file at `path`, None) or (None, why it cannot)."""
    if internals.mediapipe_metadata_writer() is None:
        return None, "mediapipe is not installed (the .[mediapipe] extra)"
    if model.input.shape[-1] != 3 or model.output.shape[-1] < 2:
        return None, "MediaPipe's ImageClassifier needs RGB input and a score per class (this model: " \
                     f"{model.input.shape[-1]} channel(s), {model.output.shape[-1]} output(s))"
    import mediapipe
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    with internals.quiet_native_info():
        classifier = vision.ImageClassifier.create_from_options(vision.ImageClassifierOptions(
            base_options=base_options.BaseOptions(model_asset_path=os.path.abspath(path)), max_results=1))

    def top_class(image):
        result = classifier.classify(mediapipe.Image(image_format=mediapipe.ImageFormat.SRGB,
                                                     data=np.ascontiguousarray(image)))
        return result.classifications[0].categories[0].index

    return top_class, None


def predicted_class(logits):
    """Top-1 class of logits: one sigmoid logit (two classes) or one per class (softmax)."""
    return (logits[:, 0] > 0).astype(np.int64) if logits.shape[-1] == 1 else logits.argmax(-1)


def class_accuracy(predicted, labels, class_names):
    """{class name: the share of its test images predicted as it}, in class order. A class without test
    images is left out: it has no accuracy (not 0)."""
    return {name: float(np.mean(predicted[labels == index] == index))
            for index, name in enumerate(class_names) if np.any(labels == index)}


def class_drops(keras_accuracy, accuracy, examples, max_drop):
    """The classes whose accuracy with an artifact is more than `max_drop` points (percentage points)
    below the Keras model's, worst first; a drop of exactly `max_drop` passes. `drop` is in the
    accuracies' own unit (0.55, not 55)."""
    drops = []
    for name, reference in keras_accuracy.items():
        drop = reference - accuracy[name]
        # Accuracies are ratios of counts, so rounding settles a tie: 1 - 19/20 is 0.05000000000000004.
        if round(100 * drop, 6) > max_drop:
            drops.append({"class": name, "keras_accuracy": reference, "accuracy": accuracy[name],
                          "drop": round(drop, 9), "examples": examples[name]})
    return sorted(drops, key=lambda row: -row["drop"])


def drop_warning(row, max_drop):
    """One line: the classes an artifact's parity row lost more than `max_drop` points on, worst first."""
    drops = row["class_drops"]
    named = ", ".join(
        f"{drop['class']} {drop['keras_accuracy']:.2f} -> {drop['accuracy']:.2f} "
        f"({drop['examples']} image{'' if drop['examples'] == 1 else 's'})" for drop in drops[:CLASSES_NAMED])
    more = f", and {len(drops) - CLASSES_NAMED} more" if len(drops) > CLASSES_NAMED else ""
    count = "1 class loses" if len(drops) == 1 else f"{len(drops)} classes lose"
    return (f"{row['format']}: {count} more than {max_drop:g} points against the Keras model: {named}{more}; "
            "see export.json")


def parity(model, artifacts, *, config, source, class_names):
    """Each artifact and the Keras model on every test image: accuracy, top-1 agreement with Keras and
    the largest logit difference; and per class of `class_names`, accuracy and the classes that lost
    more than --max_class_drop points."""
    split = source.split(config.test_split, "test_split")
    examples = pipeline.decoded(split, image_size=config.image_size, max_pixels=config.max_image_pixels).batch(config.batch_size)
    keras_logits = tf.function(lambda images: model(images, training=False))
    runners = {name: runner(name, path) for name, path in artifacts.items()}
    # MediaPipe Tasks' ImageClassifier, a client of the LiteRT files (reading their metadata), top class only.
    clients = {name: mediapipe_classifier(path, model) for name, path in artifacts.items() if name != "saved_model"}
    labels, reference, outputs = [], [], {name: [] for name in artifacts}
    client_classes = {name: [] for name, (client, _) in clients.items() if client}
    for images, batch_labels in examples.as_numpy_iterator():
        labels.append(batch_labels)
        reference.append(keras_logits(images).numpy())
        for name, run in runners.items():
            outputs[name].append(run(images))
        for name in client_classes:
            client_classes[name] += [clients[name][0](image) for image in images]
    labels, reference = np.concatenate(labels), np.concatenate(reference)
    keras_classes = predicted_class(reference)
    keras_class_accuracy = class_accuracy(keras_classes, labels, class_names)
    class_examples = {name: int(np.sum(labels == index)) for index, name in enumerate(class_names)
                      if np.any(labels == index)}
    tolerance = FLOAT_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    rows = []
    for name, path in artifacts.items():
        logits = np.concatenate(outputs[name])
        max_diff = float(np.abs(logits - reference).max())
        accuracy = class_accuracy(predicted_class(logits), labels, class_names)
        rows.append({
            "format": name,
            "path": path,
            "bytes": size_of(path),
            "test_accuracy": float(np.mean(predicted_class(logits) == labels)),
            "agreement": float(np.mean(predicted_class(logits) == keras_classes)),
            "max_logit_diff": max_diff,
            "tolerance": None if name == "litert_int8" else tolerance,
            "within_rounding": None if name == "litert_int8" else max_diff <= tolerance,
            "class_accuracy": accuracy,
            "class_drops": class_drops(keras_class_accuracy, accuracy, class_examples, config.max_class_drop),
        })
        if name in clients:
            rows[-1]["mediapipe_agreement"] = (float(np.mean(np.array(client_classes[name]) == keras_classes))
                                               if name in client_classes else None)
            rows[-1]["mediapipe"] = clients[name][1] or "ImageClassifier, top class against the Keras model's"
    channels = model.input.shape[-1]
    return {
        "job": "export",
        "model": os.path.join(config.model_dir, "model.keras"),
        # What each artifact takes: model.keras and the .tflite files the run's channels, uint8.
        "input": {"dtype": "uint8", "height": config.image_size, "width": config.image_size, "channels": channels,
                  "saved_model": "any height and width, 1 to 4 channels (converted as training does)"},
        "test_split": config.test_split,
        "test_examples": int(len(labels)),
        "keras_test_accuracy": float(np.mean(keras_classes == labels)),
        "class_examples": class_examples,
        "keras_class_accuracy": keras_class_accuracy,
        "max_class_drop": config.max_class_drop,  # Accuracy points.
        "artifacts": rows,
    }


def format_table(report):
    header = "  artifact       bytes        test acc  (keras)  agreement  max logit diff  classes below  MediaPipe agreement"
    lines = [header]
    for row in report["artifacts"]:
        client = row.get("mediapipe_agreement")
        lines.append(
            f"  {row['format']:<13} {row['bytes']:>12,}  {row['test_accuracy']:.4f}    "
            f"{report['keras_test_accuracy']:.4f}   {row['agreement']:.4f}     {row['max_logit_diff']:<14.3g}  "
            f"{len(row['class_drops']):<13}  "
            + (f"{client:.4f}" if client is not None else "-" if "mediapipe" not in row else "n/a: " + row["mediapipe"])
        )
    return "\n".join(lines)

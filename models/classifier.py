"""The classifier: raw images -> preprocessing -> backbone -> head, and where backbone weights come from.

The model carries its own preprocessing, so it takes raw uint8 images of any size, in training, in
evaluation and after export; the input pipeline never rescales pixels itself. That is how the engine
never feeds a backbone the wrong preprocessing.
"""

import os
import warnings

import keras

from transfer_engine import internals
from transfer_engine.errors import ConfigError, first_line
from transfer_engine.models.architectures import ARCHITECTURES
from transfer_engine.models.backbones import BACKBONES

BACKBONE_LAYER = "backbone"


def preprocessing(backbone, image_size, channels):
    """uint8 images of any size with `channels` channels -> the backbone's input at `image_size`.

    Built from Keras' own layers and the backbone's keras.applications `preprocess_input` applied to
    symbolic tensors, so a saved model holds it and loads in a plain Keras without this project.
    Computed in float32 under mixed precision.
    """
    entry = BACKBONES[backbone]
    inputs = keras.Input((None, None, channels), dtype="uint8", name="image")
    x = keras.ops.cast(inputs, "float32")  # Resized as floats: no rounding of interpolated pixels.
    # An op, not keras.layers.Resizing: Keras' image layers default to training=True and pass it to
    # every layer called after them, so `model(x)` would run the backbone's BatchNorm in training
    # mode (Keras 3.15; tests/test_artifacts.py checks this in a process without this project).
    x = keras.ops.image.resize(x, (image_size, image_size), interpolation="bilinear")
    if channels == 1:
        x = entry.grayscale_to_rgb(x)
    return keras.Model(inputs, entry.preprocess(x), name="preprocess")


def build_classifier(*, backbone, image_size, channels, num_classes, alpha=1.0, dropout=0.0, weights=None):
    """Preprocessing -> backbone (a nested model named 'backbone') -> pooling -> dropout -> logits.

    Two classes get one logit (sigmoid); more get one logit each (softmax). Logits are float32 even
    under mixed precision, so the loss is computed in float32. `weights` is "imagenet" or None here;
    files and earlier runs are loaded afterwards with `load_backbone_weights`.
    """
    entry = BACKBONES[backbone]
    inputs = keras.Input((None, None, channels), dtype="uint8", name="image")
    x = preprocessing(backbone, image_size, channels)(inputs)
    base = _build_backbone(entry, (image_size, image_size, 3), weights, alpha)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    units = 1 if num_classes == 2 else num_classes
    outputs = keras.layers.Dense(units, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_classifier")


def _build_backbone(entry, input_shape, weights, alpha):
    if weights == "imagenet" and not ARCHITECTURES[entry.name].has_imagenet_weights:
        raise ConfigError("weights", "imagenet", f"{entry.name} has no imagenet weights")
    try:
        model = entry.build(input_shape, weights, alpha)
    except Exception as error:  # keras.utils.get_file raises a bare Exception when offline.
        if weights != "imagenet" or not internals.is_download_failure(error):
            raise
        cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
        raise ConfigError(
            "weights", "imagenet",
            f"could not get the {entry.name} imagenet weights ({first_line(error)}); offline, copy "
            f"the file named at the end of that URL into {cache}/",
        ) from None
    # Re-wrap under a fixed name so weights can be found in any saved classifier.
    return keras.Model(model.input, model.output, name=BACKBONE_LAYER)


def load_backbone_weights(model, source):
    """Loads backbone weights into `model` from a weights file, a .keras model or an earlier run's dir
    (its backbone.weights.h5, else its model.keras).

    The head is left as built: only the backbone transfers. A file of another architecture or width
    is refused with a ConfigError naming the first layer that does not fit.
    """
    path = source
    if os.path.isdir(path):  # A finished run writes both; the backbone alone is all that is needed.
        path = next((os.path.join(source, name) for name in ("backbone.weights.h5", "model.keras")
                     if os.path.exists(os.path.join(source, name))), None)
        if path is None:
            raise ConfigError("weights", source, "is a directory without a finished run's weights")
    backbone = model.get_layer(BACKBONE_LAYER)
    with warnings.catch_warnings(record=True) as caught:  # Keras warns where it loads partially.
        warnings.simplefilter("always")
        try:
            if path.endswith(".keras"):
                donor = keras.saving.load_model(path, compile=False).get_layer(BACKBONE_LAYER)
                _copy_weights(donor, backbone)
            else:
                backbone.load_weights(path)
        except (ValueError, KeyError, OSError, TypeError) as error:
            raise ConfigError(
                "weights", source, f"does not fit this backbone: {internals.weights_mismatch(error)}"
            ) from None
    partial = [warning for warning in caught if internals.is_partial_load_warning(warning)]
    if partial:
        raise ConfigError("weights", source, f"does not fit this backbone: {first_line(partial[0].message)}")


def _copy_weights(donor, target):
    donor_weights, target_weights = donor.weights, target.weights
    if len(donor_weights) != len(target_weights):
        raise ValueError(f"the file has {len(donor_weights)} weights, this backbone {len(target_weights)}")
    for source, destination in zip(donor_weights, target_weights):
        if source.shape != destination.shape:
            raise ValueError(
                f"{destination.path} expects shape {tuple(destination.shape)}, the file has "
                f"{tuple(source.shape)}"
            )
    for source, destination in zip(donor_weights, target_weights):
        destination.assign(source)

"""The backbone registry: one entry per architecture, each knowing how to build itself and how its
input must be preprocessed.

Adding a backbone is one `Backbone(...)` entry in `BACKBONES`. Every backbone takes RGB input at the
scale its weights were trained on; `preprocess` maps float RGB pixels in [0, 255] to that scale, and
grayscale images are repeated to three channels before it (models/classifier.py), so weights are
interchangeable between grayscale and colour datasets.
"""

import dataclasses
from typing import Callable

import keras


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    # (input_shape, weights: "imagenet" or None, alpha) -> keras.Model without a classifier top.
    build: Callable
    # float32 RGB pixels in [0, 255] -> the input scale the weights were trained with.
    preprocess: Callable
    default_image_size: int
    has_imagenet_weights: bool = True


def _small_cnn(input_shape, weights, alpha):
    """3 x [Conv3x3 -> BatchNorm -> ReLU -> MaxPool], 32/32/64 filters: the ResNet50 tutorial's CNN."""
    del weights, alpha  # No pretrained weights; fixed width.
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate((32, 32, 64), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"block{block}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{block}_bn")(x)
        x = keras.layers.ReLU(name=f"block{block}_relu")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


def _mobilenet_v2(input_shape, weights, alpha):
    return keras.applications.MobileNetV2(
        input_shape=input_shape, alpha=alpha, include_top=False, weights=weights
    )


def _scale_unit(x):
    return x / 255.0


BACKBONES = {
    entry.name: entry
    for entry in (
        Backbone("small_cnn", _small_cnn, _scale_unit, default_image_size=100, has_imagenet_weights=False),
        Backbone(
            "mobilenet_v2",
            _mobilenet_v2,
            keras.applications.mobilenet_v2.preprocess_input,  # [-1, 1]
            default_image_size=224,
        ),
    )
}

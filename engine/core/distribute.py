"""Device decisions: which tf.distribute strategy, which precision, whether to use XLA, and how the
engine's steps call the model (engine/core/compiled_forward.py).

`auto` picks what was measured fastest on each kind of device (figures in docs/performance.md): on GPUs,
MirroredStrategy over several (OneDeviceStrategy on one: its input iterator prefetches batches onto the
GPU), mixed float16 (compute capability >= 7.0) and, on one GPU, XLA on the per-replica step; on one CPU, the default
strategy (no distribution: within noise of OneDeviceStrategy where measured, and nothing added),
float32 without XLA (both measured slower there), fused BatchNorm and frozen weights as graph constants
(measured faster there: fused BatchNorm with oneDNN's kernels, which internals.py turns on for x86-64;
on GPUs, XLA already fuses that work). Every path runs the same code: the default strategy implements
`run`, `reduce` and `distribute_datasets_from_function` for one replica.
"""

import dataclasses
import json
import os

from absl import logging
import keras
import tensorflow as tf

from transfer_engine.errors import ConfigError, first_line
from transfer_engine import internals


API_NAMES = {
    "default": "the default strategy (no distribution)",
    "mirrored": "MirroredStrategy",
    "one_device": "OneDeviceStrategy",
    "multi_worker": "MultiWorkerMirroredStrategy",
    "tpu": "TPUStrategy",
}


@dataclasses.dataclass(frozen=True)
class Devices:
    strategy: tf.distribute.Strategy
    strategy_name: str  # tf.distribute's public name for it.
    kind: str  # "GPU" or "CPU"
    precision: str
    jit_compile: bool
    fused_batchnorm: bool = False  # See engine/core/compiled_forward.py.
    frozen_as_constants: bool = False  # See engine/core/compiled_forward.py.
    onednn: bool = False  # TensorFlow's oneDNN CPU kernels are on (internals.py asks for them).
    num_workers: int = 1
    worker_index: int = 0  # Position in the cluster, chief first: this worker's input shard.
    is_chief: bool = True  # The one worker that writes the run directory.
    cluster_resolver: object = None  # Multi-worker and TPU strategies only.

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


def _cluster(config):
    """(strategy, resolver, workers, index, is_chief) for --strategy=multi_worker or tpu."""
    if config.strategy == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=config.tpu or None)
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, tf.errors.OpError) as error:
            raise ConfigError("strategy", "tpu", f"no TPU found ({first_line(error)})") from None
        return tf.distribute.TPUStrategy(resolver), resolver, 1, 0, True
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec().as_dict()
    if not spec:
        raise ConfigError(
            "strategy", "multi_worker", "needs TF_CONFIG describing the cluster and this task (see docs/multi-gpu.md)"
        )
    chiefs, workers = len(spec.get("chief", [])), len(spec.get("worker", []))
    task_type, task_id = resolver.task_type, resolver.task_id
    index = 0 if task_type == "chief" else chiefs + task_id
    is_chief = task_type == "chief" or (not chiefs and task_id == 0)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    return strategy, resolver, chiefs + workers, index, is_chief


# One strategy per process and kind: --job=compare and benchmark assemble a run per mode, and strategies
# created side by side start their collective instance keys at the same base, so one strategy's all-reduce
# is matched with another's ("Shape mismatch in the collective instance 100", then every collective fails).
_STRATEGIES = {}


def _strategy(config, strategy_name, devices, kind):
    """(strategy, cluster resolver, workers, worker index, is chief) for a resolved --strategy."""
    if strategy_name in ("multi_worker", "tpu"):
        return _cluster(config)
    if strategy_name == "mirrored":
        # TensorFlow's default cross-device ops: collective all-reduces, on logical CPUs (--cpu_replicas) as
        # on GPUs (NCCL), so CPU tests run what a GPU box runs.
        strategy = tf.distribute.MirroredStrategy(devices)
    elif strategy_name == "one_device":
        strategy = tf.distribute.OneDeviceStrategy(devices[0])
    else:
        strategy = tf.distribute.get_strategy()
    return strategy, None, 1, 0, True


def configure(config):
    """Creates the strategy (once per process and kind: later runs reuse it) and sets the global Keras
    precision policy; logs every decision."""
    try:  # Every tf.distribute strategy reads it, not only multi_worker.
        json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as error:
        raise ConfigError("strategy", config.strategy, f"TF_CONFIG is not JSON ({error})") from None
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
        strategy_name = "mirrored" if len(devices) > 1 else "one_device" if kind == "GPU" else "default"
    key = (strategy_name, tuple(devices), config.tpu if strategy_name == "tpu" else "",
           os.environ.get("TF_CONFIG", "") if strategy_name == "multi_worker" else "")
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _strategy(config, strategy_name, devices, kind)
    strategy, resolver, num_workers, worker_index, is_chief = _STRATEGIES[key]
    kind = "TPU" if strategy_name == "tpu" else kind

    precision = config.precision
    if precision == "auto":
        precision = "mixed_float16" if kind == "GPU" and _gpu_supports_float16(gpus) else "float32"
        precision = "mixed_bfloat16" if kind == "TPU" else precision
    keras.mixed_precision.set_global_policy(precision)

    # XLA on one GPU only: with several replicas Keras 3 turns XLA off itself, per-replica XLA has open
    # reports of thread exhaustion after many steps, and its gain there is unmeasured (docs/multi-gpu.md).
    # --jit_compile=true forces it (engine/core/steps.py compiles the replicas' forward and backward pass).
    # Nor under --deterministic: XLA has no deterministic gradient for some ops (MaxPool's, in small_cnn's
    # blocks and ResNet50's stem).
    jit_compile = {"auto": kind == "GPU" and strategy.num_replicas_in_sync == 1 and not config.deterministic,
                   "true": True, "false": False}[config.jit_compile]
    fused_batchnorm = {"auto": kind == "CPU", "true": True, "false": False}[config.fused_batchnorm]
    onednn = internals.onednn_enabled()
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.grad_accum_steps > 1 and strategy.num_replicas_in_sync > 1:
        raise ConfigError(
            "grad_accum_steps", config.grad_accum_steps,
            f"runs on one replica only, not {strategy.num_replicas_in_sync}: Keras' accumulation puts the "
            "update in a cond, where tf.distribute cannot all-reduce",
        )
    if config.step_batch % strategy.num_replicas_in_sync:
        raise ConfigError(
            "batch_size", config.batch_size,
            f"must be divisible by the {strategy.num_replicas_in_sync} replicas"
            + (f" x --grad_accum_steps={config.grad_accum_steps}" if config.grad_accum_steps > 1 else ""),
        )
    logging.info(
        "Devices: %s x %d (%s), strategy %s%s, precision %s, XLA %s%s%s%s%s",
        kind, strategy.num_replicas_in_sync // num_workers, ", ".join(devices), API_NAMES[strategy_name],
        f", worker {worker_index} of {num_workers}" if num_workers > 1 else "", precision,
        "on" if jit_compile else "off", ", oneDNN CPU kernels" if onednn else "",
        ", fused BatchNorm" if fused_batchnorm else "",
        ", frozen weights as constants" if kind == "CPU" else "",
        ", deterministic ops" if config.deterministic else "",
    )
    return Devices(
        strategy=strategy, strategy_name=API_NAMES[strategy_name], kind=kind, precision=precision,
        jit_compile=jit_compile, fused_batchnorm=fused_batchnorm, frozen_as_constants=kind == "CPU", onednn=onednn,
        num_workers=num_workers, worker_index=worker_index, is_chief=is_chief, cluster_resolver=resolver,
    )


def agree_on_minimum(devices, value):
    """The smallest of every worker's `value` (an int), so that all workers run the same steps."""
    if devices.num_workers == 1:
        return value
    strategy = devices.strategy
    local = strategy.run(lambda: tf.constant([value], tf.int64))
    return int(tf.reduce_min(strategy.gather(local, axis=0)))

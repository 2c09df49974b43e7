"""engine/core/distribute.py: strategy, precision and XLA decisions on a CPU-only machine."""

import keras
import pytest
import tensorflow as tf

from transfer_engine.engine.core import distribute
from transfer_engine.errors import ConfigError
from helpers import tiny_config


def test_one_cpu_replica_uses_the_default_strategy_float32_without_xla():
    devices = distribute.configure(tiny_config(cpu_replicas=1))
    assert devices.strategy is tf.distribute.get_strategy()
    assert devices.strategy_name == "the default strategy (no distribution)"
    assert (devices.kind, devices.num_replicas, devices.precision, devices.jit_compile) == (
        "CPU", 1, "float32", False
    )
    assert devices.fused_batchnorm and devices.frozen_as_constants  # Measured faster on CPU.


def test_one_device_strategy_is_still_there_to_choose():
    devices = distribute.configure(tiny_config(strategy="one_device"))
    assert isinstance(devices.strategy, tf.distribute.OneDeviceStrategy) and devices.num_replicas == 1


def test_fused_batchnorm_can_be_switched_off():
    assert not distribute.configure(tiny_config(fused_batchnorm="false")).fused_batchnorm
    assert distribute.configure(tiny_config(fused_batchnorm="true")).fused_batchnorm
    assert keras.mixed_precision.global_policy().name == "float32"


def test_cpu_replicas_mirror_over_logical_cpu_devices():
    devices = distribute.configure(tiny_config(cpu_replicas=2))
    assert isinstance(devices.strategy, tf.distribute.MirroredStrategy)
    assert devices.num_replicas == 2
    assert devices.precision == "float32" and not devices.jit_compile


def test_every_run_of_a_process_reuses_its_strategy(monkeypatch):
    """--job=compare and benchmark assemble a run per mode: a second MirroredStrategy beside the first would
    start its collective keys where the first's did."""
    created = []
    original = tf.distribute.MirroredStrategy
    monkeypatch.setattr(tf.distribute, "MirroredStrategy", lambda *a, **k: created.append(1) or original(*a, **k))
    monkeypatch.setattr(distribute, "_STRATEGIES", {})
    first = distribute.configure(tiny_config(cpu_replicas=2, precision="float32"))
    second = distribute.configure(tiny_config(cpu_replicas=2, precision="mixed_float16", mode="frozen"))
    assert second.strategy is first.strategy and len(created) == 1
    assert second.precision == "mixed_float16"  # Every other decision is still the run's own.
    assert distribute.configure(tiny_config(strategy="one_device")).strategy is not first.strategy


def test_explicit_precision_sets_the_keras_policy():
    devices = distribute.configure(tiny_config(precision="mixed_bfloat16"))
    assert devices.precision == "mixed_bfloat16"
    assert keras.mixed_precision.global_policy().compute_dtype == "bfloat16"


def test_batch_must_divide_across_replicas():
    with pytest.raises(ConfigError, match=r"^--batch_size=9: must be divisible by the 2 replicas$"):
        distribute.configure(tiny_config(cpu_replicas=2, batch_size=9))


def test_more_replicas_than_the_process_has_is_refused():
    with pytest.raises(ConfigError, match=r"^--cpu_replicas=3: this process already runs with 2"):
        distribute.configure(tiny_config(cpu_replicas=3))

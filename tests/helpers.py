"""Plain helpers for the tests (fixtures live in conftest.py)."""

import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time

import tensorflow as tf

from transfer_engine.engine.config import Config, validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    """A validated config that trains in seconds: small_cnn, 32 px, three Fashion-MNIST classes."""
    values = dict(
        model_dir="unused",
        backbone="small_cnn",
        image_size=32,
        weights="none",
        mode="scratch",
        dataset="fashion_mnist",
        label_subset=(6, 0, 2),
        train_split="train[:1%]",
        eval_split="test[:100]",
        test_split="test[100:200]",
        batch_size=8,
        epochs=1,
        steps_per_loop=2,
        dropout=0.0,
        deterministic=True,
    )
    values.update(overrides)
    return validate(Config(**values))


def shared(tmp_path_factory, name, make):
    """A directory `make(path)` fills once per test session, whichever xdist worker asks first (the
    other waits for it): for what tests only read. A test that changes it copies it first."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # The session's, above each worker's own.
    path = root / "shared" / name
    path.parent.mkdir(exist_ok=True)
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(f"{path}.made"):
            shutil.rmtree(path, ignore_errors=True)
            make(str(path))
            open(f"{path}.made", "w").close()
    return str(path)


def launch(*args, env=None, timeout=600):
    """Runs launch.py in a subprocess; returns the CompletedProcess (text output). `env` adds
    variables to this process's environment; a None value removes one."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch.py"), *args],
        cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def stopped_after_checkpoint(args, step, log, timeout=600):
    """Starts launch.py `args` with engine/core/checkpoints.py's test cue: it stops itself (SIGSTOP) right after
    writing its first checkpoint at `step` or later. Returns the Popen once it is stopped there; its output
    goes to the file `log` (a full pipe would block it before the cue), which `output(process)` reads."""
    from transfer_engine.engine.core.checkpoints import STOP_AFTER_CHECKPOINT

    with open(log, "w") as file:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                                   env={**os.environ, STOP_AFTER_CHECKPOINT: str(step)}, stdout=file,
                                   stderr=subprocess.STDOUT)
    process.log = str(log)
    deadline = time.time() + timeout
    while _process_state(process.pid) != "T":
        if process.poll() is not None:
            raise AssertionError(f"the run ended (status {process.returncode}) before its checkpoint at step "
                                 f"{step}:\n{output(process)[-3000:]}")
        assert time.time() < deadline, f"no checkpoint at step {step} within {timeout} s"
        time.sleep(0.02)
    return process


def _process_state(pid):
    """The state letter of /proc/PID/stat ('T': stopped)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def output(process):
    """What a process of `stopped_after_checkpoint` has printed so far."""
    with open(process.log) as f:
        return f.read()


def launch_in_process(*args):
    """launch.py's flag parsing and main, in this process: (exit status, what it printed on stderr).
    An exception that launch.py lets through (a bug) propagates, with its traceback."""
    from absl import flags

    from transfer_engine import launch

    flags.FLAGS.unparse_flags()  # Flags of an earlier call must not leak into this one.
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = launch.main(launch.parse_flags(["launch.py", *args]))
        except SystemExit as exit:  # The flag parser exits on bad flags.
            status = exit.code
    return status, stderr.getvalue()


def digest_tree(path):
    """{relative path: sha1} of every file under `path`."""
    digests = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                digests[os.path.relpath(full, path)] = hashlib.sha1(f.read()).hexdigest()
    return digests


def tiny_flags(config):
    """A tiny config as launch.py arguments."""
    return [line for line in config.to_flagfile().splitlines() if line]


def replace(config, **changes):
    return validate(dataclasses.replace(config, **changes))


def default_strategy():
    """No distribution: what --strategy=auto runs on one CPU."""
    return tf.distribute.get_strategy()


def one_device():
    return tf.distribute.OneDeviceStrategy("/cpu:0")


def two_devices():
    """Two CPU replicas reduced on one device, as `--cpu_replicas=2` runs (collective ops' keys clash
    between the strategies one test process creates)."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice())


def on_two_simulated_gpus(code, timeout=300):
    """Runs `code` (Python, with `strategy`: a MirroredStrategy over two logical CPUs that tf.distribute
    takes for GPUs) in a subprocess; returns its last line of output, parsed as JSON. An XLA function
    passed to `strategy.run` then runs per replica, and tf.distribute's synchronisation inside it takes the
    path without merge_call (MirroredExtended._use_merge_call), as on a GPU box. A hang fails (timeout)."""
    script = "\n".join([
        "import json, sys",
        f"sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]",
        "from transfer_engine import internals",
        "import tensorflow as tf",
        "from tensorflow.python.distribute import mirrored_run, mirrored_strategy",
        "from transfer_engine.engine.core import distribute",
        "distribute.split_cpu(2)",
        "mirrored_run._is_gpu_device = mirrored_strategy._is_gpu_device = lambda device: True",
        "strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])",
        code,
    ])
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def hparams_rows(logdir):
    """What TensorBoard's HParams plugin reads below `logdir`: {session run: ({hparam: value}, {(run, tag):
    last scalar value} of the session's runs)}."""
    from tensorboard.backend.event_processing import event_multiplexer
    from tensorboard.plugins.hparams import metadata

    multiplexer = event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    rows = {}
    for run, tags in multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME).items():
        if metadata.SESSION_START_INFO_TAG in tags:
            info = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
            hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
                       for name, value in info.hparams.items()}
            scalars = {(other, tag): float(tf.make_ndarray(multiplexer.Tensors(other, tag)[-1].tensor_proto))
                       for other in multiplexer.Runs() if other.startswith(run + "/")
                       for tag in multiplexer.Runs()[other].get("tensors", [])
                       if multiplexer.SummaryMetadata(other, tag).plugin_data.plugin_name == "scalars"}
            rows[run] = (hparams, scalars)
    return rows


def train_run(config, model_dir):
    """Runs the train job in-process into `model_dir`; returns results.json as a dict."""
    from transfer_engine.engine.jobs import training

    return training.train(replace(config, model_dir=str(model_dir)))


def load_weights_file(path):
    """{variable path: array} of a Keras .weights.h5 file, read through a small_cnn backbone."""
    from transfer_engine.models.backbones import BACKBONES

    backbone = BACKBONES["small_cnn"].build((32, 32, 3), None, 1.0)
    backbone.load_weights(path)
    return {weight.path: weight.numpy() for weight in backbone.weights}


def step_with_an_overflow_on_one_replica(strategy, jit_compile=False):
    """One mixed_float16 SGD step on two replicas whose batch overflows float16 on the second replica only
    (all-255 images through a large kernel) and not on the first (zeros). Returns ({variable path: its
    values on each replica}, the loss scale on each replica, the initial loss scale)."""
    import keras
    import numpy as np

    from transfer_engine.engine.core.optimizer import make_optimizer
    from transfer_engine.engine.core.steps import Trainer

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            inputs = keras.Input((2, 2, 1), dtype="uint8")
            x = keras.layers.Flatten()(keras.ops.cast(inputs, "float32"))
            x = keras.layers.Dense(3, kernel_initializer=keras.initializers.Constant(100.0), name="big")(x)
            model = keras.Model(inputs, keras.layers.Activation("linear", dtype="float32", name="logits")(x))
            optimizer = make_optimizer(name="sgd", learning_rate=0.1, weight_decay=0.0, precision="mixed_float16",
                                       variables=model.trainable_weights)
        local = lambda variable: [v.numpy() for v in strategy.experimental_local_results(variable.value)]
        initial = float(local(optimizer.dynamic_scale)[0])
        trainer = Trainer(model=model, optimizer=optimizer, strategy=strategy, global_batch_size=4,
                          variables=model.trainable_weights, jit_compile=jit_compile)
        images = np.concatenate([np.zeros((2, 2, 2, 1), np.uint8), np.full((2, 2, 2, 1), 255, np.uint8)])
        batch = tf.data.Dataset.from_tensors((images, np.array([0, 1, 0, 1]))).repeat()
        trainer.train_steps(iter(strategy.experimental_distribute_dataset(batch)), tf.constant(1))
        weights = {w.path: [value.tolist() for value in local(w)] for w in model.trainable_weights}
        scales = [float(value) for value in local(optimizer.dynamic_scale)]
        return weights, scales, initial
    finally:
        keras.mixed_precision.set_global_policy("float32")

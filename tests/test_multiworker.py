"""--strategy=multi_worker: two worker processes on loopback, one CPU replica each, train the same weights
as one process with two CPU replicas at the same global batch.

Every step takes the whole training split as its global batch (64 examples), so both setups average
the gradient over the same examples however they are sharded; BatchNorm is frozen and there is no
dropout, so no per-replica statistic differs. What remains is float summation order.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

from helpers import ROOT, launch, tiny_config, tiny_flags

pytestmark = pytest.mark.slow  # Three processes, each a whole training.


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def read(model_dir, name):
    with open(os.path.join(model_dir, name)) as f:
        return json.load(f)


def final_weights(model_dir):
    return [w.numpy() for w in keras.saving.load_model(os.path.join(model_dir, "model.keras")).weights]


def test_two_loopback_workers_train_what_two_local_replicas_train(data_dir, pretrained_run, tmp_path):
    config = tiny_config(
        data_dir=data_dir, label_subset=(), train_split="train[:64]", eval_split="test[:50]",
        test_split="test[50:91]", batch_size=64, epochs=3, mode="finetune", unfreeze=4,
        weights=os.path.join(pretrained_run, "backbone.weights.h5"), dropout=0.0,
    )
    single_dir, multi_dir = str(tmp_path / "single"), str(tmp_path / "multi")
    single = launch(*tiny_flags(config), f"--model_dir={single_dir}", "--cpu_replicas=2")
    assert single.returncode == 0, single.stderr[-3000:]

    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    workers = []
    try:
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            workers.append(subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "launch.py"), *tiny_flags(config),
                 f"--model_dir={multi_dir}", "--strategy=multi_worker"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            ))
        outputs = [worker.communicate(timeout=300) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-3000:]
    assert "MultiWorkerMirroredStrategy, worker 0 of 2" in outputs[0][1]
    assert "MultiWorkerMirroredStrategy, worker 1 of 2" in outputs[1][1]

    # The chief writes the run directory; the other worker writes its own copy aside.
    assert os.path.exists(os.path.join(multi_dir, "results.json"))
    assert os.path.exists(os.path.join(multi_dir, "workertemp_1", "results.json"))
    assert os.path.isdir(os.path.join(multi_dir, "checkpoints", "workertemp_1"))

    ours, theirs = read(multi_dir, "results.json"), read(single_dir, "results.json")
    assert (ours["global_step"], ours["test_examples"], ours["devices"]["replicas"]) == (3, 41, 2)
    assert ours["test_examples"] == theirs["test_examples"]
    for key in ("train_loss", "train_accuracy", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, err_msg=key)
    for a, b in zip(final_weights(multi_dir), final_weights(single_dir)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert ours["trainability_audit"]["frozen_changed"] == 0

"""The divergence guard (engine/core/loop.py): an exploded or non-finite loss stops the run (exit 3), and the
checkpoint it names as the last good one restores to finite predictions."""

import math
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from transfer_engine.errors import EXIT_DIVERGED
from helpers import launch_in_process, tiny_flags
from transfer_engine.models.classifier import build_classifier


def diverge(tiny, model_dir, **overrides):
    config = tiny(model_dir=str(model_dir), mode="scratch", optimizer="sgd", steps_per_loop=1, **overrides)
    status, stderr = launch_in_process(*tiny_flags(config))
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == EXIT_DIVERGED and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_an_exploded_finite_loss_is_divergence(tiny, tmp_path):
    """SGD at lr 1e6 keeps the loss finite (~1e10) at chance accuracy: above 100 x ln 3, it stops."""
    error = diverge(tiny, tmp_path / "run", learning_rate=1e6)
    bound = 100 * math.log(3)
    match = re.fullmatch(rf"error: training diverged: loss above --loss_upper_bound={bound:.4g} from step (\d+) "
                         r"to (\d+); last good checkpoint: none \(lower --learning_rate, or check the data\)", error)
    assert match and int(match.group(1)) <= int(match.group(2)), error
    assert not os.path.exists(tmp_path / "run" / "results.json")


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_the_bound_is_a_flag(tiny, tmp_path):
    error = diverge(tiny, tmp_path / "run", learning_rate=0.001, loss_upper_bound=0.01)
    assert error.startswith("error: training diverged: loss above --loss_upper_bound=0.01 from step 1 to 2;"), error


@pytest.mark.slow  # Trains for several seconds: the fast tier stays within a minute.
def test_the_named_last_good_checkpoint_predicts_finite_logits(tiny, tmp_path):
    """lr 1e10 with a checkpoint every step: no checkpoint holding a non-finite variable (BatchNorm's
    moving variance included) is ever saved, so the one named restores to finite predictions."""
    error = diverge(tiny, tmp_path / "run", learning_rate=1e10, checkpoint_every=1, warmup_steps=3)
    named = re.search(r"last good checkpoint: (\S+) ", error)
    assert named and named.group(1) != "none", error
    model = build_classifier(backbone="small_cnn", image_size=32, channels=1, num_classes=3)
    tf.train.Checkpoint(model=model).restore(named.group(1)).expect_partial()
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 1), dtype="uint8")
    assert np.all(np.isfinite(model.predict(images, verbose=0))), error
    assert all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.variables
               if keras.backend.is_float_dtype(v.dtype))


def test_no_checkpoint_is_saved_while_a_variable_is_not_finite():
    """The save-time check itself (the run-level tests look only at the checkpoint the message names)."""
    from types import SimpleNamespace

    import keras

    from transfer_engine.engine.core import loop
    from transfer_engine.errors import Diverged

    saved = []
    checkpoints = SimpleNamespace(save=lambda: saved.append(1), newest_before=lambda step: "ckpt-1")
    weight, moment = keras.Variable([1.0, 2.0]), keras.Variable([0.5])
    trainer = SimpleNamespace(model=SimpleNamespace(variables=[weight]), optimizer=SimpleNamespace(variables=[moment]))
    loop._save(checkpoints, trainer, step=7, last_finite_step=5)
    assert saved == [1]
    for variable, value in ((weight, [1.0, float("nan")]), (moment, [float("inf")])):
        variable.assign(value)
        with pytest.raises(Diverged, match=r"not finite after step 7; last good checkpoint: ckpt-1"):
            loop._save(checkpoints, trainer, step=7, last_finite_step=5)
        assert saved == [1]
        variable.assign([1.0, 2.0] if variable is weight else [0.5])

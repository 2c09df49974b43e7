"""engine/jobs/lr_find.py: the learning-rate range test."""

import json

import numpy as np
import pytest

from transfer_engine.engine.jobs import lr_find
from helpers import digest_tree, launch_in_process, tiny_flags, train_run


def test_the_suggestion_is_the_steepest_fall_before_the_minimum():
    rates = list(np.geomspace(1e-5, 1, 11))
    smoothed = [2.0, 2.0, 1.98, 1.9, 1.5, 1.0, 0.9, 0.85, 0.9, 3.0, 9.0]
    assert lr_find.suggest(rates, smoothed) == pytest.approx(rates[4])  # 1.9 -> 1.5 -> 1.0 around index 4.
    assert lr_find.suggest(rates[:2], [1.0, 2.0]) == rates[0]


def test_the_sweep_stops_when_the_smoothed_loss_explodes():
    assert not lr_find.exploded([1.0, 0.8, 0.5, 1.9])
    assert lr_find.exploded([1.0, 0.8, 0.5, 2.1]) and lr_find.exploded([1.0, float("nan")])


@pytest.mark.slow  # Trains or decodes for several seconds: the fast tier stays within a minute.
def test_lr_find_sweeps_up_to_the_explosion_and_leaves_the_run_as_it_was(tiny, pretrained_run, tmp_path):
    config = tiny(model_dir=str(tmp_path / "run"), mode="frozen", weights=pretrained_run, train_split="train[:2%]")
    train_run(config, tmp_path / "run")
    before = digest_tree(tmp_path / "run")
    status, stderr = launch_in_process(*tiny_flags(config), "--job=lr_find")
    assert status == 0, stderr
    after = digest_tree(tmp_path / "run")
    assert {name: digest for name, digest in after.items() if not name.startswith("lr_find.")} == before
    assert sorted(set(after) - set(before)) == ["lr_find.json", "lr_find.png"]
    with open(tmp_path / "run" / "lr_find.json") as f:
        report = json.load(f)
    rates = np.array(report["rates"])
    assert rates[0] == pytest.approx(lr_find.MIN_RATE) and np.allclose(rates[1:] / rates[:-1], rates[1] / rates[0])
    # The rates took effect: the last ones throw the loss far above where it started.
    assert max(report["losses"][-5:]) > 3 * report["losses"][0], report["losses"]
    assert report["stopped"] in ("loss exploded", f"{lr_find.STEPS} steps")
    assert len(rates) == lr_find.STEPS or lr_find.exploded(report["smoothed_losses"])
    assert report["suggested_rate"] in report["rates"] and report["rule"] == lr_find.RULE

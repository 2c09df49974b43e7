"""engine/config.py: flags come from the Config fields, validation names the flag and the value."""

import dataclasses
import glob
import os

from absl import flags
import pytest

from transfer_engine.engine import config as config_lib
from transfer_engine.engine.config import Config, validate
from transfer_engine.errors import ConfigError
from transfer_engine.engine.core.run_dir import read_flagfile_text
from helpers import ROOT


def parse(*argv):
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    flag_values(["launch.py", *argv])
    return config_lib.from_flags(flag_values)


def test_every_field_is_a_flag_with_its_default():
    flag_values = flags.FlagValues()
    config_lib.define_flags(flag_values)
    for field in dataclasses.fields(Config):
        default = flag_values[field.name].default
        expected = list(field.default) if isinstance(field.default, tuple) else field.default
        assert default == expected, f"--{field.name} default {default!r} != field {expected!r}"


def test_flags_parse_into_a_validated_config():
    config = parse("--model_dir=/tmp/x", "--backbone=small_cnn", "--label_subset=6,0,2", "--batch_size=16")
    assert config.label_subset == (6, 0, 2)
    assert config.batch_size == 16
    assert config.image_size == 100, "image_size defaults to the backbone's own"


def test_flagfile_text_rebuilds_the_same_config(tmp_path):
    config = parse("--model_dir=/tmp/x", "--mode=finetune", "--unfreeze=5", "--label_subset=3,1")
    flagfile = tmp_path / "flags.txt"
    flagfile.write_text(config.to_flagfile())
    assert parse(f"--flagfile={flagfile}") == config
    assert read_flagfile_text(config.to_flagfile())["label_subset"] == "3,1"


def test_auto_split_flags_and_an_empty_label_subset_undo_a_flagfiles_values(tmp_path):
    flagfile = tmp_path / "given.flags"
    flagfile.write_text("--model_dir=/tmp/x\n--backbone=small_cnn\n--label_subset=6,0,2\n--train_split=train\n"
                        "--eval_split=validation\n--test_split=test\n")
    given = parse(f"--flagfile={flagfile}")
    assert (given.label_subset, given.train_split, given.eval_split, given.test_split) == (
        (6, 0, 2), "train", "validation", "test")
    undone = parse(f"--flagfile={flagfile}", "--label_subset=", "--train_split=auto", "--eval_split=auto",
                   "--test_split=auto")
    assert (undone.label_subset, undone.train_split, undone.eval_split, undone.test_split) == ((), None, None, None)
    assert undone == parse("--model_dir=/tmp/x", "--backbone=small_cnn"), "auto must mean not given"


def test_every_flag_has_its_facts_with_its_field_and_the_tables_come_from_them():
    """One home per flag: its group in --help, its role for a run (identity, the run's model, an hparam, a
    setting) and its own check live with its field; FLAG_GROUPS and the role tables are read off them."""
    names = [field.name for field in dataclasses.fields(Config)]
    for field in dataclasses.fields(Config):
        facts = field.metadata
        assert facts["group"] in config_lib.GROUPS and facts["role"] in config_lib.ROLES, field.name
        assert facts["valid"] is None or callable(facts["valid"]), field.name
    grouped = [name for _, _, group in config_lib.FLAG_GROUPS for name in group]
    assert sorted(grouped) == sorted(names), "a flag in no group of --help, or in two"
    assert set(config_lib.RUN_MODEL_FLAGS) < set(config_lib.IDENTITY_FLAGS) < set(config_lib.HPARAM_FLAGS) < set(names)
    assert {"model_dir", "data_dir", "checkpoint_every"}.isdisjoint(config_lib.hparams(Config(model_dir="/tmp/x")))
    with pytest.raises(TypeError, match="group"):  # A new field must say where it belongs.
        config_lib._option(1, "A flag without its facts.", role=config_lib.HPARAM)


def test_the_trust_flags_take_their_whole_ranges():
    """The edges that mean something: any drop warned of, an accuracy of 1 asked for, no threshold."""
    for changes in ({"max_class_drop": 0.0}, {"target_accuracy": 1.0}, {"min_confidence": 0.0, "near_duplicate": 0.0}):
        validate(dataclasses.replace(Config(model_dir="/tmp/x", backbone="small_cnn"), **changes))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "bogus"}, "--mode=bogus: must be one of scratch, frozen, finetune"),
        ({"backbone": "vgg99"}, "--backbone=vgg99: must be one of"),
        ({"optimizer": "lion"}, "--optimizer=lion: must be one of"),
        ({"precision": "fp8"}, "--precision=fp8: must be one of"),
        ({"strategy": "tpu_pod"}, "--strategy=tpu_pod: must be one of"),
        ({"batch_size": 0}, "--batch_size=0: must be positive"),
        ({"epochs": -1}, "--epochs=-1: must be positive"),
        ({"learning_rate": 0.0}, "--learning_rate=0.0: must be positive"),
        ({"image_size": 0}, "--image_size=0: must be positive"),
        ({"mode": "finetune", "unfreeze": 0}, "--unfreeze=0: --mode=finetune needs"),
        ({"label_subset": (1, 1)}, "--label_subset=1,1: labels must not repeat"),
        ({"label_subset": (4,)}, "--label_subset=4: a classifier needs at least 2 labels"),
        ({"model_dir": None}, "--model_dir=: --job=train needs a run directory"),
        ({"weights": "/no/such.weights.h5"}, "--weights=/no/such.weights.h5: no such file"),
        ({"deterministic": True, "jit_compile": "true"}, "--jit_compile=true: XLA has no deterministic"),
        ({"cpu_replicas": 2, "strategy": "one_device"}, "--cpu_replicas=2: needs --strategy"),
        ({"max_class_drop": -1.0}, "--max_class_drop=-1.0: must be 0 or more accuracy points"),
        ({"max_class_drop": float("nan")}, "--max_class_drop=nan: must be 0 or more accuracy points"),
        ({"min_confidence": 1.0}, "--min_confidence=1.0: must be in [0, 1)"),
        ({"near_duplicate": 1.0}, "--near_duplicate=1.0: must be in [0, 1)"),
        ({"target_accuracy": 1.01}, "--target_accuracy=1.01: must be in (0, 1]"),
    ],
)
def test_bad_values_name_the_flag_and_value(changes, message):
    config = dataclasses.replace(Config(model_dir="/tmp/x", backbone="small_cnn"), **changes)
    with pytest.raises(ConfigError) as raised:
        validate(config)
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_non_integer_labels_are_refused():
    with pytest.raises(ConfigError, match=r"--label_subset=a,1: labels must be integers"):
        parse("--model_dir=/tmp/x", "--label_subset=a,1")


def test_every_job_choice_has_a_job():
    from transfer_engine.engine import jobs

    assert sorted(jobs.JOBS) == sorted(config_lib.JOBS)


@pytest.mark.parametrize("flagfile", sorted(
    os.path.relpath(path, ROOT) for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.flags"), recursive=True)
))
def test_every_shipped_flagfile_is_a_valid_config(flagfile, monkeypatch):
    monkeypatch.chdir(ROOT)  # Flagfiles include each other by paths relative to the repository root.
    config = parse(f"--flagfile={flagfile}")
    assert config.model_dir.startswith("runs/"), config.model_dir

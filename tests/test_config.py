"""Config loading: defaults file in sync, overlays load, bad keys and values fail with a useful message."""

import glob
import os

import pytest

from lit_dreamer.config import CONFIG_DIR, ConfigError, help_text, load_config, to_yaml


def test_defaults_yaml_matches_the_dataclass_defaults():
    with open(os.path.join(CONFIG_DIR, "defaults.yaml")) as f:
        text = "".join(line for line in f if not line.startswith("#"))
    assert text == to_yaml(load_config()), "regenerate configs/defaults.yaml with `python -m lit_dreamer config`"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)))
def test_every_config_file_loads(path):
    load_config([path])


def test_overlays_apply_in_order_then_overrides():
    cfg = load_config(["cartpole", "size/size12m"], ["run.steps=77"])
    assert cfg.env.id == "CartPole-v1" and cfg.model.size == "size12m" and cfg.run.steps == 77
    assert load_config(["size/size12m", "cartpole"]).model.size == "size1m"  # later wins


@pytest.mark.parametrize("override, message", [
    ("run.stpes=5", "unknown config key 'run.stpes'.*run.steps"),
    ("model.size=size3m", "unknown model.size 'size3m'.*size1m, size12m"),
    ("run.steps=abc", "bad value for run.steps"),
    ("trainer.devics=2", "trainer.devices"),
    ("env.obs=rgb", "env.obs must be 'proprio' or 'pixels'"),
    ("run.steps", "not of the form key=value"),
    ("run.batch_length=1", "batch_length must be at least 2"),
    ("model.cnn_mults=[]", r"model.cnn_mults must be a non-empty list.*\[2,3,4,4\]"),
    ("model.cnn_mults=[2,0]", "model.cnn_mults must be a non-empty list of positive"),
    ("model.cnn_kernel=0", "model.cnn_kernel must be positive"),
])
def test_bad_overrides_name_the_problem(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([], [override])


def test_unknown_config_file_lists_the_choices():
    with pytest.raises(ConfigError, match="cartpole"):
        load_config(["cartpol"])


def test_help_lists_keys_with_defaults_and_docs():
    text = help_text()
    assert "run.train_ratio = 512.0" in text
    assert "Replayed steps per env step" in text
    assert "model.size = 'size1m'" in text


def test_mlflow_tracking_uri_variable_replaces_the_default_but_not_files_or_overrides(tmp_path, monkeypatch):
    from lit_dreamer.compare import CompareOptions, options_help

    assert load_config().logger.tracking_uri == "sqlite:///mlflow.db"
    assert CompareOptions().tracking_uri == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_config(["cartpole"]).logger.tracking_uri == "http://mlflow.example:5000"
    assert CompareOptions().tracking_uri == "http://mlflow.example:5000"
    assert "tracking_uri = 'http://mlflow.example:5000'" in options_help()
    assert load_config([], ["logger.tracking_uri=sqlite:///x.db"]).logger.tracking_uri == "sqlite:///x.db"
    overlay = tmp_path / "store.yaml"
    overlay.write_text("logger:\n  tracking_uri: sqlite:///from_file.db\n")
    assert load_config([str(overlay)]).logger.tracking_uri == "sqlite:///from_file.db"

"""Config loading: defaults file in sync, overlays load, bad keys and values fail with a useful message."""

import glob
import os
import re

import pytest

from lit_dreamer.agent_config import SIZES
from lit_dreamer.config import CONFIG_DIR, ConfigError, help_text, load_config, to_annotated_yaml


def test_defaults_yaml_matches_the_dataclass_defaults():
    with open(os.path.join(CONFIG_DIR, "defaults.yaml")) as f:
        text = "".join(line for line in f if not line.startswith("#"))
    expected = to_annotated_yaml(load_config())
    assert text == expected, "regenerate configs/defaults.yaml with `python -m lit_dreamer config`"


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


# --------------------------------------------------------------------------------------------------
# Clear `error:` lines for bad input (issue 18): exit 2, the problem and the fix, nothing written


def fit_cli_in(root, *args: str) -> int:
    """The exit code of `main(["fit", "-c", "debug", ...])` with its MLflow store in root."""
    from lit_dreamer.__main__ import main
    code = main(["fit", "-c", "debug", *args, f"logger.tracking_uri=sqlite:///{root}/mlflow.db"])
    return code


def assert_refused(code: int, capsys, *expected: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    assert err.startswith("error: ") and "Traceback" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"
    return err


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  steps: 5\n  seed: [1\nenv:\n  id: CartPole-v1\n")
    with pytest.raises(ConfigError, match=r"YAML syntax error in config file .*bad\.yaml, line 4, column 4"):
        load_config([str(bad)])
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("run:\n\tsteps: 5\n")
    with pytest.raises(ConfigError, match=r"tabs\.yaml, line 2, column 1: found character .*indent with spaces"):
        load_config([str(tabs)])
    code = fit_cli_in(tmp_path, "-c", str(bad), f"run.dir={tmp_path}/run")
    assert_refused(code, capsys, str(bad), "line 4, column 4")
    assert sorted(os.listdir(tmp_path)) == ["bad.yaml", "tabs.yaml"]  # no MLflow store, no run folder


def test_config_file_that_is_not_sections_is_refused(tmp_path):
    listing = tmp_path / "list.yaml"
    listing.write_text("- run.steps=5\n")
    with pytest.raises(ConfigError, match="holds a ListConfig, not sections of keys"):
        load_config([str(listing)])


def test_env_id_with_a_module_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = fit_cli_in(tmp_path, "env.id=nosuchmod:Foo-v0", f"run.dir={tmp_path}/run")
    assert_refused(code, capsys, "env.id='nosuchmod:Foo-v0'", "cannot import 'nosuchmod'",
                   "No module named 'nosuchmod'", "PYTHONPATH")
    assert os.listdir(tmp_path) == []


def test_run_dir_below_a_file_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    code = fit_cli_in(tmp_path, f"run.dir={tmp_path}/afile/run")
    assert_refused(code, capsys, f"run.dir={tmp_path}/afile/run cannot be created", "is a file, not a folder")
    assert os.listdir(tmp_path) == ["afile"]  # no MLflow store (so no MLflow run), no run folder


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits (the next test covers root)")
def test_read_only_run_dir_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    code = fit_cli_in(tmp_path, f"run.dir={tmp_path}/ro/run")
    assert_refused(code, capsys, "is not writable", "Permission denied", "run.dir=DIR")
    assert sorted(os.listdir(tmp_path)) == ["ro"] and os.listdir(tmp_path / "ro") == []


def test_unwritable_run_dir_is_refused_before_an_mlflow_run_opens(tmp_path, monkeypatch, capsys):
    # Stands in for a read-only file system or folder when the tests run as root (who passes permission
    # bits): the write probe fails the way the kernel makes it fail there.
    import errno
    import lit_dreamer.train as train

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(train.tempfile, "mkstemp", refuse)
    code = fit_cli_in(tmp_path, f"run.dir={tmp_path}/ro")
    assert_refused(code, capsys, f"run.dir={tmp_path}/ro is not writable", "Read-only file system")
    assert os.listdir(tmp_path) == ["ro"] and os.listdir(tmp_path / "ro") == []


def test_writable_run_dir_check_leaves_no_file_behind(tmp_path):
    from lit_dreamer.train import check_writable_dir
    check_writable_dir(str(tmp_path / "new" / "run"))
    check_writable_dir(str(tmp_path))
    assert os.listdir(tmp_path) == []


FIT_SET_TRAINER_ARGS = [
    ("logger", "false", "logger.tracking_uri"),
    ("callbacks", "[]", "lit_dreamer.train.build"),
    ("max_steps", "5", "run.steps"),
    ("max_epochs", "1", "run.steps"),
    ("enable_checkpointing", "true", "run.checkpoint_every"),
    ("log_every_n_steps", "5", "run.log_every"),
    ("num_sanity_val_steps", "2", "run.eval_every"),
    ("default_root_dir", "somewhere", "run.dir"),
]


@pytest.mark.parametrize("name, value, instead", FIT_SET_TRAINER_ARGS, ids=[a[0] for a in FIT_SET_TRAINER_ARGS])
def test_trainer_args_that_fit_sets_are_refused_naming_the_run_key(tmp_path, name, value, instead):
    refused = rf"trainer\.{name} in override .* is set by fit itself.*{re.escape(instead)}"
    with pytest.raises(ConfigError, match=refused):
        load_config(["debug"], [f"trainer.{name}={value}"])
    overlay = tmp_path / "trainer.yaml"
    overlay.write_text(f"trainer:\n  {name}: {value}\n")
    with pytest.raises(ConfigError, match=rf"trainer\.{name} in config file .*trainer\.yaml is set by fit"):
        load_config([str(overlay)])


def test_trainer_arg_that_fit_sets_opens_no_mlflow_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = fit_cli_in(tmp_path, "trainer.max_steps=5", f"run.dir={tmp_path}/run")
    assert_refused(code, capsys, "trainer.max_steps", "run.steps")
    assert os.listdir(tmp_path) == []  # today: a TypeError after the MLflow run was opened


def test_trainer_args_that_fit_sets_are_refused_in_a_config_built_in_code():
    from lit_dreamer.config import Config, validate
    with pytest.raises(ConfigError, match="trainer.default_root_dir in the trainer section.*run.dir"):
        validate(Config(trainer={"accelerator": "cpu", "default_root_dir": "x"}))


def test_other_trainer_args_still_pass_through():
    cfg = load_config(["debug"], ["trainer.max_time=00:00:01:00", "trainer.devices=1"])
    assert cfg.trainer["max_time"] == "00:00:01:00"


# --------------------------------------------------------------------------------------------------
# What users expect


def test_accelerator_defaults_to_lightnings_auto_and_cpu_can_be_forced():
    assert load_config().trainer["accelerator"] == "auto"
    assert load_config(["defaults"]).trainer["accelerator"] == "auto"
    assert load_config([], ["trainer.accelerator=cpu"]).trainer["accelerator"] == "cpu"
    assert "trainer.accelerator = 'auto'" in help_text()


def test_config_command_shows_the_preset_dimensions_as_comments(capsys):
    from lit_dreamer.__main__ import main
    assert main(["config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for key, value in SIZES["size1m"].items():
        assert f"  {key}: null  # {value} from model.size=size1m" in lines
    assert main(["config", "-c", "defaults", "model.size=size12m", "model.units=100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"  deter: null  # {SIZES['size12m']['deter']} from model.size=size12m" in lines
    assert f"  units: 100  # overrides the {SIZES['size12m']['units']} of model.size=size12m" in lines


def test_printed_config_and_defaults_file_keep_null_so_another_size_still_applies(tmp_path, capsys):
    from lit_dreamer.__main__ import main
    assert main(["config"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    for base in (str(printed), "defaults"):
        cfg = load_config([base], ["model.size=size12m"])
        assert cfg.model.deter is None and cfg.model.resolved().deter == SIZES["size12m"]["deter"]
        assert vars(cfg.model.resolved()).items() >= SIZES["size12m"].items()


def test_a_runs_config_yaml_keeps_null_dimensions(tmp_path, monkeypatch):
    import torch
    from lit_dreamer.train import fit
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_DREAMER_RUN_NAME", raising=False)
    torch.set_num_threads(1)
    dims = [f"model.{key}=null" for key in ("deter", "hidden", "classes", "depth", "units")]
    fit(load_config(["debug"], [*dims, "run.steps=62", "run.prefill=60", f"run.dir={tmp_path}/run",
                                f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]))
    saved = load_config([str(tmp_path / "run" / "config.yaml")], ["model.size=size12m"])
    assert [getattr(saved.model, key) for key in SIZES["size1m"]] == [None] * 5
    assert vars(saved.model.resolved()).items() >= SIZES["size12m"].items()


def test_a_config_file_from_before_free_nats_moved_to_world_model_still_loads(tmp_path):
    # free_nats was behavior.free_nats until it moved to the world model's section: old files keep working.
    old = tmp_path / "old.yaml"
    old.write_text("behavior:\n  free_nats: 0.25\n  horizon: 5\n")
    cfg = load_config([str(old)])
    assert cfg.world_model.free_nats == 0.25 and cfg.behavior.horizon == 5
    assert not hasattr(cfg.behavior, "free_nats")
    assert load_config([str(old)], ["world_model.free_nats=0.5"]).world_model.free_nats == 0.5  # later wins
    assert load_config([], ["behavior.free_nats=0.75"]).world_model.free_nats == 0.75
    both = tmp_path / "both.yaml"
    both.write_text("behavior:\n  free_nats: 0.25\nworld_model:\n  free_nats: 0.5\n")
    with pytest.raises(ConfigError, match="behavior.free_nats and world_model.free_nats are both set.*keep only "
                                          f"world_model.free_nats.*{both}"):
        load_config([str(both)])


def test_a_saved_config_from_before_free_nats_moved_is_a_valid_resume_base():
    # `fit --resume` starts from the saved config (the checkpoint's, or an older run's config.yaml).
    cfg = load_config([], ["run.seed=2"], base={"behavior": {"free_nats": 0.5}, "run": {"seed": 1}})
    assert cfg.world_model.free_nats == 0.5 and cfg.run.seed == 2


def test_fit_from_a_script_checks_the_config_before_anything_runs(tmp_path, monkeypatch):
    from lit_dreamer.config import Config
    from lit_dreamer.train import fit
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        fit(Config(trainer={"accelerator": "cpu", "max_steps": 5}))
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store


def test_replay_sampling_is_checked_against_the_sampler_table(monkeypatch):
    from lit_dreamer import sampling

    with pytest.raises(ConfigError, match="unknown replay.sampling 'recent'; choose one of uniform, recency, reward "
                                          r"\(did you mean recency\?\)"):
        load_config([], ["replay.sampling=recent"])

    class Prioritized(sampling.UniformSampler):
        pass

    # A new sampler is one class and one table entry: the config accepts it with no other change.
    monkeypatch.setitem(sampling.SAMPLERS, "prioritized", Prioritized)
    assert load_config([], ["replay.sampling=prioritized"]).replay.sampling == "prioritized"
    with pytest.raises(ConfigError, match="choose one of uniform, recency, reward, prioritized"):
        load_config([], ["replay.sampling=rank"])


def test_reward_sampling_is_refused_with_several_tasks_and_its_fraction_checked():
    with pytest.raises(ConfigError, match="replay.sampling=reward .* use it with one task"):
        load_config([], ["replay.sampling=reward", "env.tasks=[CartPole-v1,Acrobot-v1]"])
    with pytest.raises(ConfigError, match=r"replay.reward_fraction must be within \[0, 1\], got -0.5"):
        load_config([], ["replay.reward_fraction=-0.5"])
    assert load_config([], ["replay.sampling=reward", "replay.reward_fraction=0.5"]).replay.reward_fraction == 0.5


RECIPE_KEYS = ("train_ratio", "batch_length", "prefill")


def test_an_included_file_comes_first_and_the_including_file_wins(tmp_path):
    (tmp_path / "base.yaml").write_text("run:\n  steps: 111\n  prefill: 7\noptim:\n  lr: 0.5\n")
    (tmp_path / "task.yaml").write_text(f"include: [{tmp_path / 'base.yaml'}]\nrun:\n  steps: 222\n")
    cfg = load_config([str(tmp_path / "task.yaml")], ["optim.lr=0.25"])
    assert (cfg.run.steps, cfg.run.prefill, cfg.optim.lr) == (222, 7, 0.25)


def test_an_include_cycle_and_a_bad_include_are_refused_naming_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text(f"include: [{tmp_path / 'b.yaml'}]\n")
    (tmp_path / "b.yaml").write_text(f"include: [{tmp_path / 'a.yaml'}]\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config([str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("include: budget\n")
    with pytest.raises(ConfigError, match="must be a list of config names"):
        load_config([str(tmp_path / "c.yaml")])
    (tmp_path / "d.yaml").write_text("include: [no_such_recipe]\n")
    with pytest.raises(ConfigError, match="no_such_recipe"):
        load_config([str(tmp_path / "d.yaml")])


@pytest.mark.parametrize("task", ["cartpole", "dmc_cartpole_balance", "dmc_walker_walk", "point_goal", "babyai"])
def test_task_files_take_their_hyperparameters_from_the_one_budget_recipe(task):
    """The recipe lives in configs/budget.yaml only: a task file that set a learning rate or ratio of its own fails."""
    import yaml
    with open(os.path.join(CONFIG_DIR, f"{task}.yaml")) as f:
        own = yaml.safe_load(f)
    assert own["include"] == ["budget"]
    assert "optim" not in own and "behavior" not in own and not set(own.get("run", {})) & set(RECIPE_KEYS)
    recipe, cfg = load_config(["budget"]), load_config([task])
    assert cfg.optim == recipe.optim and cfg.behavior == recipe.behavior and cfg.model.size == recipe.model.size
    assert all(getattr(cfg.run, k) == getattr(recipe.run, k) for k in RECIPE_KEYS)

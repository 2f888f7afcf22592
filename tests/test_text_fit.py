"""A tiny CLI fit on an env with a gymnasium Text observation, and its vocabulary through checkpoints:
resumed (ckpt_path=last), evaluated and used as init.ckpt, the token ids never shift."""

from __future__ import annotations

import math

import pytest
import torch

from lit_dreamer.config import load_config
from lit_dreamer.envs import make_env
from tests.test_system import explain, fit_cli, history, load_ckpt, only_run, run_overrides
from tests.text_envs import INSTRUCTIONS, TEXT_ENV

STEPS, PREFILL = 200, 60


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    proc = fit_cli(root, f"env.id={TEXT_ENV}", f"run.steps={STEPS}", f"run.prefill={PREFILL}", "env.text_length=6")
    return root, proc


def last_checkpoint(root):
    return root / "run" / "checkpoints" / "last" / "model.ckpt"


@pytest.mark.timeout(300)
def test_a_cli_fit_on_a_text_env_logs_the_text_reconstruction_and_saves_the_vocabulary(text_run):
    root, proc = text_run
    assert proc.returncode == 0, explain(proc)
    run = only_run(root)
    rec = history(root, run.info.run_id, "loss/rec/mission")
    assert len(rec) >= 10 and all(math.isfinite(m.value) and m.value > 0 for m in rec)
    ckpt = load_ckpt(last_checkpoint(root))
    assert ckpt["hyper_parameters"]["obs_spec"]["mission"] == [[6], "int64"]
    words = ckpt["lit_dreamer"]["text_vocabulary"]["mission"]
    assert sorted(words) == ["go", "left", "right"] and words[0] == "go"
    assert float(run.data.params["loss_scales.text"]) == 1.0


def swap_saved_words(path) -> list[str]:
    """Rewrite the checkpoint's vocabulary with 'left' and 'right' swapped: ids no fresh env would give."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    go, first, second = ckpt["lit_dreamer"]["text_vocabulary"]["mission"]
    ckpt["lit_dreamer"]["text_vocabulary"]["mission"] = swapped = [go, second, first]
    torch.save(ckpt, path)
    return swapped


def ids_of(words: list[str], text: str) -> list[int]:
    return [words.index(word) + 2 for word in text.split()]


@pytest.mark.timeout(400)
def test_resume_eval_and_init_give_the_envs_the_checkpoints_ids(text_run, tmp_path):
    import shutil

    from lit_dreamer.evaluation import checkpoint_vocabularies, load_module
    from lit_dreamer.train import run_vocabularies
    root, proc = text_run
    assert proc.returncode == 0, explain(proc)
    shutil.copytree(root / "run", tmp_path / "run", symlinks=True)
    swapped = swap_saved_words(last_checkpoint(tmp_path))
    resume = load_config(["debug"], run_overrides(tmp_path, f"env.id={TEXT_ENV}", "env.text_length=6",
                                                  "ckpt_path=last"))
    init = load_config(["debug"], run_overrides(tmp_path / "new", f"env.id={TEXT_ENV}", "env.text_length=6",
                                                f"init.ckpt={tmp_path / 'run'}"))
    module, _ = load_module(str(last_checkpoint(tmp_path)))
    for vocabularies in (run_vocabularies(resume), run_vocabularies(init),
                         checkpoint_vocabularies(str(last_checkpoint(tmp_path)), module)):
        env = make_env(TEXT_ENV, text_length=6, vocabularies=vocabularies)
        for seed in range(4):
            observation, _ = env.reset(seed=seed)
            assert observation["mission"][:2].tolist() == ids_of(swapped, INSTRUCTIONS[env.unwrapped.target])
    # A resumed fit keeps the checkpoint's ids and saves them again.
    proc = fit_cli(tmp_path, f"env.id={TEXT_ENV}", f"run.steps={STEPS + 20}", f"run.prefill={PREFILL}",
                   "env.text_length=6", "ckpt_path=last")
    assert proc.returncode == 0, explain(proc)
    assert load_ckpt(last_checkpoint(tmp_path))["lit_dreamer"]["text_vocabulary"]["mission"] == swapped

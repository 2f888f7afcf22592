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


def instruction_policy(module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's posterior logits and the actor's action probabilities on its mean latent, for an
    observation that holds only the instruction (the vector part is the same in both instructions)."""
    wm, actor = module.world_model, module.actor_critic.actor
    obs = {"vector": torch.zeros(1, 1, 2), "mission": ids[None, None]}
    state, action = module.initial_carry(1)
    deter = wm.rssm.sequence_step(state, action)
    logits = wm.rssm.post_logits(deter, wm.encode(obs)[:, 0])
    feat = torch.cat([deter, wm.rssm.dist(logits).mean().flatten(-2)], -1)
    return logits, actor.dist(actor(feat)).mean()


@pytest.mark.timeout(300)
def test_after_a_short_fit_the_instruction_alone_changes_the_latent_the_actor_reads(text_run):
    from lit_dreamer.distributions import kl_divergence
    from lit_dreamer.evaluation import checkpoint_vocabularies, load_module
    root, proc = text_run
    assert proc.returncode == 0, explain(proc)
    module, _ = load_module(str(last_checkpoint(root)))
    vocabulary = checkpoint_vocabularies(str(last_checkpoint(root)), module).for_key("mission", None)
    with torch.no_grad():
        (left_logits, left), (right_logits, right) = (
            instruction_policy(module, torch.as_tensor(vocabulary.encode(text, 6))) for text in INSTRUCTIONS)
    rssm = module.world_model.rssm
    # The posteriors of the two instructions are far apart (KL about 0.37 nats at seed 0)...
    assert kl_divergence(rssm.dist(left_logits), rssm.dist(right_logits)).item() > 0.01
    # ... and the actor reads the difference. After ~140 training steps (lr warmup of 1000) the policy is still
    # nearly uniform (0.4998 vs 0.5002), so this checks the path, not that the task is learned.
    assert not torch.allclose(left, right)


@pytest.mark.timeout(300)
def test_eval_with_shuffled_text_runs_and_says_so_in_its_mlflow_run(text_run, tmp_path, capsys):
    import mlflow

    from lit_dreamer.__main__ import main
    root, proc = text_run
    assert proc.returncode == 0, explain(proc)
    uri = f"sqlite:///{tmp_path / 'eval.db'}"
    assert main(["eval", "--ckpt", str(root / "run"), "episodes=4", "text=shuffled", f"tracking_uri={uri}"]) == 0
    assert "(text=shuffled: each episode's policy read another episode's text)" in capsys.readouterr().out
    [run] = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("lit_dreamer")
                                                  .experiment_id])
    assert run.data.params["text"] == "shuffled"


@pytest.mark.timeout(300)
def test_the_blanked_instruction_ablation_trains_without_reading_or_predicting_the_text(tmp_path, capsys):
    """`model.mlp_keys='(?!mission).*'` (docs/language.md): the replay still stores the mission, but the world
    model has no text encoder or decoder, so the latent, and the actor reading it, cannot depend on it."""
    proc = fit_cli(tmp_path, f"env.id={TEXT_ENV}", f"run.steps={PREFILL + 40}", f"run.prefill={PREFILL}",
                   "env.text_length=6", "model.mlp_keys=(?!mission).*")
    assert proc.returncode == 0, explain(proc)
    run = only_run(tmp_path)
    assert history(tmp_path, run.info.run_id, "loss/rec/vector")
    assert not history(tmp_path, run.info.run_id, "loss/rec/mission")
    ckpt = load_ckpt(last_checkpoint(tmp_path))
    assert ckpt["hyper_parameters"]["obs_spec"]["mission"] == [[6], "int64"]  # stored, not read
    assert not [name for name in ckpt["state_dict"] if "text_" in name]
    # Nothing reads the text, so the shuffled-text control has nothing to shuffle: eval says so.
    from lit_dreamer.__main__ import main
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "episodes=4", "text=shuffled"]) != 0
    assert "this checkpoint reads none" in capsys.readouterr().err


def script_module(monkeypatch, name: str):
    """A script under scripts/ as a module (the diagnostics import diagnose_world_model beside them)."""
    from tests.test_examples import REPO, load_script
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    return load_script(name)


def instruction_diagnostic(monkeypatch):
    return script_module(monkeypatch, "diagnose_instruction.py")


def fit_checkpoint_and_replay(text_run):
    """The tiny text fit's last checkpoint, its saved replay and the replay's filled rows."""
    from lit_dreamer.replay import Replay
    root, proc = text_run
    assert proc.returncode == 0, explain(proc)
    ckpt = last_checkpoint(root).resolve()
    replay = Replay.load(str(ckpt.parent / "replay-rank0"))
    return ckpt, replay, len(replay) // replay.num_envs


def script_report(module, argv: list[str], capsys, monkeypatch) -> dict:
    """The JSON that a script's main() prints when run with argv."""
    import json
    import sys
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    module.main()
    return json.loads(capsys.readouterr().out)


def test_neighbour_texts_gives_each_episode_the_next_episodes_text(monkeypatch):
    diagnose = instruction_diagnostic(monkeypatch)
    data = {"is_first": torch.tensor([1, 0, 1, 0, 0, 1]), "mission": torch.tensor([[1], [1], [2], [2], [2], [1]])}
    swapped, differs = diagnose.neighbour_texts(data, ["mission"])
    # Episodes hold texts 1, 2, 1: the first gets 2, the second 1, the last wraps to the first's (1, its own).
    assert swapped["mission"].flatten().tolist() == [2, 2, 1, 1, 1, 1]
    assert differs.tolist() == [True, True, True, True, True, False]


@pytest.mark.timeout(300)
def test_the_instruction_diagnostic_reads_the_checkpoint_and_its_replay(text_run, capsys, monkeypatch):
    ckpt, replay, rows = fit_checkpoint_and_replay(text_run)
    reward, terminal = replay._data["reward"][:rows], replay._data["is_terminal"][:rows]
    successes = int(((reward > 0) & terminal.astype(bool)).sum())
    assert successes > 0, "a random policy picks the named action at the last of 5 steps in about half the episodes"
    report = script_report(instruction_diagnostic(monkeypatch), ["diagnose_instruction.py", str(ckpt)], capsys,
                           monkeypatch)
    assert report["steps"] == len(replay) and report["successes"] == successes
    # Every success compared has a neighbour with the other instruction: about half of them.
    assert 0 < report["success"]["compared"] < successes
    assert report["success"]["real_reward"] == 1.0
    # The other episodes end on a wrong action: terminal, no reward.
    failures = int(((reward <= 0) & terminal.astype(bool)).sum())
    assert failures > 0 and report["failure"]["count"] == failures
    assert 0 <= report["failure"]["p_continue"] <= 1 and math.isfinite(report["failure"]["reward"])
    assert math.isfinite(report["failure"]["one_step_imagined_reward"])
    # TextChoice has 2 actions: the actor's probability of either lies within unimix's floor and 1.
    for name in ("success", "failure"):
        assert 0.005 <= report["actor"][f"p_last_action_before_{name}"] <= 1
    value = report["value"]
    assert all(math.isfinite(value[k]) for k in ("all_steps", "before_success", "success_one_step_return"))
    assert value["success_one_step_advantage"] == pytest.approx(
        value["success_one_step_return"] - value["before_success"], abs=2e-4)
    # Episodes last 5 steps: rolls of up to 5 steps stay inside the episode, 10 and 15 would cross a reset.
    assert list(report["open_loop"]) == ["0", "1", "3", "5"]
    for entry in report["open_loop"].values():
        assert entry["n"] == successes
        assert 0 <= entry["text_token_accuracy"] <= 1 and 0 <= entry["text_whole_accuracy"] <= 1
        assert 0 <= entry["p_continue"] <= 1


def action_share_script(monkeypatch):
    return script_module(monkeypatch, "action_shares.py")


def test_action_shares_are_counted_per_window_of_rows(monkeypatch):
    import numpy as np
    script = action_share_script(monkeypatch)
    eye = torch.eye(3).numpy()
    # 5 rows of 2 envs: rows 0-1 take actions (0, 1) and (0, 0), rows 2-3 (2, 2) and (1, 2), row 4 a zero
    # action (an episode's first step) and action 1.
    actions = [[eye[0], eye[1]], [eye[0], eye[0]], [eye[2], eye[2]], [eye[1], eye[2]], [eye[0] * 0, eye[1]]]
    shares = script.action_shares(np.array(actions), window_rows=2)
    assert shares == [[0.75, 0.25, 0.0], [0.0, 0.25, 0.75], [0.0, 1.0, 0.0]]


@pytest.mark.timeout(300)
def test_action_shares_read_the_checkpoints_replay(text_run, capsys, monkeypatch):
    ckpt, replay, rows = fit_checkpoint_and_replay(text_run)
    data = replay.storage
    episodes = int(data["is_last"][:rows].sum())
    successes = int((data["is_terminal"][:rows].astype(bool) & (data["reward"][:rows] > 0)).sum())
    argv = ["action_shares.py", str(ckpt), "--window", "100", "--names", "a,b"]
    report = script_report(action_share_script(monkeypatch), argv, capsys, monkeypatch)
    assert report["env_steps"] == len(replay) and report["actions"] == ["a", "b"]
    windows = report["windows"]
    assert [w["from"] for w in windows] == list(range(0, len(replay), report["window"]))
    assert sum(w["env_steps"] for w in windows) == len(replay)
    assert sum(w["episodes"] for w in windows) == episodes > 0
    assert sum(w["successes"] for w in windows) == successes
    for window in windows:
        assert sum(window["share"].values()) == pytest.approx(1, abs=1e-3)

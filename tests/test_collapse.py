"""The collapse detector: `ac/advantage_sign_bias` and CollapseWatch's entropy-and-return warning."""

from __future__ import annotations

import mlflow
import pytest
import torch

from lit_dreamer.callbacks.collapse import CollapseWatch, collapse_suspected, return_stalled
from lit_dreamer.config import ConfigError, load_config


def test_return_stalled_at_its_start_level():
    records = [(1000, -500.0), (2000, -500.0), (3000, -500.0), (4000, -500.0)]
    assert return_stalled(records, now=4000, window=2000)


def test_a_rising_return_is_not_stalled():
    records = [(1000, 20.0), (2000, 60.0), (3000, 150.0), (4000, 300.0)]
    assert not return_stalled(records, now=4000, window=2000)


def test_a_return_that_fell_from_its_peak_is_stalled():
    # CartPole-like: solved at 3-4k, then fallen. Last window (4k, 6k]: 45, 60 against 480, 488 before.
    records = [(1000, 20.0), (2000, 100.0), (3000, 480.0), (4000, 488.0), (5000, 45.0), (6000, 60.0)]
    assert return_stalled(records, now=6000, window=2000)


def test_a_return_held_at_its_best_is_not_stalled():
    records = [(1000, 20.0), (2000, 300.0), (3000, 500.0), (4000, 500.0), (5000, 500.0), (6000, 500.0)]
    assert not return_stalled(records, now=6000, window=2000)


def test_changes_within_five_percent_of_the_range_count_as_none():
    # Range 100: a drop of 4 from the window before is within the 5-point tolerance, one of 6 is not.
    steady = [(1000, 0.0), (2000, 100.0), (3000, 100.0), (4000, 96.0)]
    assert not return_stalled(steady, now=4000, window=1000)
    dropped = [(1000, 0.0), (2000, 100.0), (3000, 100.0), (4000, 94.0)]
    assert return_stalled(dropped, now=4000, window=1000)


def test_no_verdict_before_a_whole_window_has_passed():
    records = [(1000, -500.0), (1500, -500.0)]
    assert not return_stalled(records, now=1500, window=2000)
    assert not return_stalled([], now=5000, window=1000)


STUCK = [(1000, -500.0), (2000, -500.0), (3000, -500.0), (4000, -500.0)]


def test_a_collapse_needs_low_entropy_a_stalled_return_and_biased_advantages():
    biased = [(3000, -0.98), (3500, -1.0), (4000, -0.99)]
    assert collapse_suspected(0.1, 0.2, biased, STUCK, now=4000, window=2000)
    assert not collapse_suspected(0.3, 0.2, biased, STUCK, now=4000, window=2000), "entropy still high"
    rising = [(1000, 20.0), (2000, 60.0), (3000, 150.0), (4000, 300.0)]
    assert not collapse_suspected(0.1, 0.2, biased, rising, now=4000, window=2000), "return rising"
    centred = [(3000, 0.45), (3500, -0.1), (4000, 0.3)]
    assert not collapse_suspected(0.1, 0.2, centred, STUCK, now=4000, window=2000), "mean bias 0.22 < 0.5"
    # Only the window's readings count: an old biased phase does not make a centred critic biased now.
    old_then_centred = [(1000, 1.0), (1500, 1.0), (3000, 0.1), (4000, 0.0)]
    assert not collapse_suspected(0.1, 0.2, old_then_centred, STUCK, now=4000, window=2000)


def test_sign_bias_is_the_mean_over_the_mean_absolute_advantage():
    from lit_dreamer.actor_critic import ActorCritic
    from lit_dreamer.agent_config import BehaviorConfig, ModelConfig
    model = ModelConfig(deter=16, hidden=8, classes=2, stoch=2, units=8, blocks=2)
    ac = ActorCritic(feat_dim=20, action_dim=2, discrete=True, model=model, behavior=BehaviorConfig(horizon=3))
    H, N = 3, 5
    torch.manual_seed(0)
    feat = torch.randn(H + 1, N, 20)
    actions = torch.nn.functional.one_hot(torch.randint(2, (H, N)), 2).float()
    reward = torch.rand(H + 1, N) * 4 - 2
    cont = torch.ones(H + 1, N)
    metrics = ac.behavior_losses(feat, actions, ac.actor(feat[:-1]), reward, cont).metrics
    expected = metrics["ac/advantage"] / metrics["ac/advantage_abs"]
    assert torch.allclose(metrics["ac/advantage_sign_bias"], expected)
    assert -1.0 <= float(metrics["ac/advantage_sign_bias"]) <= 1.0


def test_centering_changes_what_the_actor_learns_from_but_not_the_lag_metrics():
    """behavior.advantage_center: the actor loss takes the centered advantage, the metrics the critic's lag."""
    from lit_dreamer.actor_critic import ActorCritic
    from lit_dreamer.agent_config import BehaviorConfig, ModelConfig
    from lit_dreamer.losses import actor_loss, center_advantage
    model = ModelConfig(deter=16, hidden=8, classes=2, stoch=2, units=8, blocks=2)
    H, N = 3, 5
    torch.manual_seed(0)
    feat = torch.randn(H + 1, N, 20)
    actions = torch.nn.functional.one_hot(torch.randint(2, (H, N)), 2).float()
    reward = torch.rand(H + 1, N) * 4 + 1  # all positive: an untrained critic lags every return
    cont = torch.ones(H + 1, N)
    results = {}
    for center in (False, True):
        torch.manual_seed(1)
        ac = ActorCritic(feat_dim=20, action_dim=2, discrete=True, model=model,
                         behavior=BehaviorConfig(horizon=3, advantage_center=center))
        params = ac.actor(feat[:-1])
        results[center] = ac.behavior_losses(feat, actions, params, reward, cont), ac.actor.dist(params)
    (plain, dist), (centered, _) = results[False], results[True]
    assert float(plain.metrics["ac/advantage_sign_bias"]) > 0.9  # nearly every advantage positive
    for key in ("ac/advantage", "ac/advantage_abs", "ac/advantage_sign_bias"):
        assert torch.equal(plain.metrics[key], centered.metrics[key])
    assert torch.equal(plain.losses["value"], centered.losses["value"])
    # The actor loss is -w * (A * log p + scale * H): recover the uncentered A from the plain loss, then the
    # centered loss must be the same expression with A minus its weighted mean.
    weight = (torch.cumprod(BehaviorConfig().gamma * cont, 0) / BehaviorConfig().gamma)[:-1].T
    log_prob, entropy = dist.log_prob(actions).T.detach(), dist.entropy().T.detach()
    scale = BehaviorConfig().entropy
    advantage = (-plain.losses["policy"].detach() / weight - scale * entropy) / log_prob
    expected = actor_loss(log_prob, entropy, center_advantage(advantage, weight), weight, scale)
    assert torch.allclose(centered.losses["policy"].detach(), expected, atol=1e-5)
    assert (advantage > 0).float().mean() > 0.9 and not torch.allclose(plain.losses["policy"], expected, atol=1e-3)


@pytest.mark.parametrize("overrides, message", [
    (["run.collapse_entropy=1.5"], "run.collapse_entropy must be in [0, 1)"),
    (["run.collapse_window=0"], "run.collapse_window must be a positive number"),
])
def test_bad_collapse_settings_are_refused(overrides, message):
    from lit_dreamer.config import validate
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validate(load_config(["debug"], overrides))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_run_driven_into_a_biased_collapse_logs_the_metric_and_warns(tmp_path, monkeypatch, one_thread):
    """Critic frozen at 0 under CartPole's +1 rewards: every advantage is positive (sign bias 1). A negative
    entropy bonus then makes the policy deterministic, and a one-action CartPole policy falls in 9-10 steps,
    below the random policy's ~20: the return never rises. The warning must fire and be in MLflow."""
    from lit_dreamer.train import fit
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_DREAMER_RUN_NAME", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(["debug"], [
        f"run.dir={tmp_path / 'run'}", f"logger.tracking_uri={uri}", "env.id=CartPole-v1", "run.steps=200",
        "run.log_every=5", "optim.actor_lr=0.01", "optim.critic_lr=1e-9", "optim.warmup=0",
        "behavior.entropy=-1", "run.collapse_entropy=0.5", "run.collapse_window=50"])
    with pytest.warns(UserWarning, match="possible policy collapse") as caught:
        fit(cfg)
    assert sum("possible policy collapse" in str(w.message) for w in caught) == 1, "warned once, not every check"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])[0]

    def values(key):
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]

    bias = values("ac/advantage_sign_bias")
    assert bias and min(bias[1:]) > 0.99, bias  # the first step's critic and returns are both about 0
    ratio, suspected = values("collapse/entropy_ratio"), values("collapse/suspected")
    assert ratio[0] == pytest.approx(1.0) and min(ratio) < 0.5
    assert suspected[0] == 0.0 and suspected[-1] == 1.0


def test_the_watch_keeps_its_reference_and_records_across_a_resume():
    watch = CollapseWatch(0.1, 1000)
    watch.initial_entropy, watch.records, watch.source, watch.warned = 0.69, [(1000, 20.0), (2000, 9.0)], "eval", True
    watch.sign_bias = [(1900, 0.9), (2000, 0.95)]
    restored = CollapseWatch(0.1, 1000)
    restored.load_state_dict(watch.state_dict())
    assert (restored.initial_entropy, restored.records, restored.sign_bias, restored.source, restored.warned) == (
        0.69, [(1000, 20.0), (2000, 9.0)], [(1900, 0.9), (2000, 0.95)], "eval", True)


def test_the_watch_is_off_when_the_fraction_is_zero(tmp_path, monkeypatch):
    from lit_dreamer.config import load_config as load
    from lit_dreamer.train import build
    monkeypatch.chdir(tmp_path)
    cfg = load(["debug"], [f"run.dir={tmp_path / 'run'}", "run.collapse_entropy=0"])
    assert not [cb for cb in build(cfg)[2] if isinstance(cb, CollapseWatch)]
    cfg = load(["debug"], [f"run.dir={tmp_path / 'run'}"])
    assert [cb for cb in build(cfg)[2] if isinstance(cb, CollapseWatch)]


def test_terminal_weight_of_the_continue_loss_reaches_the_training_step(in_tmp, monkeypatch):
    """loss_scales.con_terminal: every training step weighs its batch's terminal steps in the continue loss."""
    import lit_dreamer.module as module_file
    from lit_dreamer.train import fit
    calls = []
    original = module_file.weight_terminal_steps

    def spy(loss, is_terminal, weight):
        out = original(loss, is_terminal, weight)
        calls.append((weight, int(is_terminal.sum()), bool(torch.equal(out, loss))))
        return out

    monkeypatch.setattr(module_file, "weight_terminal_steps", spy)
    # CartPole under a random-ish policy ends an episode every ~20 steps: batches hold terminal steps.
    summary = fit(load_config(["debug"], [f"run.dir={in_tmp}/run", "logger.backend=none", "run.steps=120",
                                          "run.prefill=60", "loss_scales.con_terminal=3"]))
    assert len(calls) == summary["train_steps"] > 0 and {w for w, _, _ in calls} == {3.0}
    assert any(n > 0 and not same for _, n, same in calls)  # a batch with terminals got a different loss

"""Contracts of the agent's components: shapes, resets, where gradients flow and where they stop."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_dreamer.actor_critic import ActorCritic
from lit_dreamer.agent_config import SIZES, AgentConfig, BehaviorConfig, ModelConfig
from lit_dreamer.distributions import BoundedNormal, TwoHot
from lit_dreamer.losses import actor_loss, critic_loss, lambda_returns
from lit_dreamer.nets import BlockGRU, BlockLinear, ImageDecoder, ImageEncoder
from lit_dreamer.normalizer import ReturnNormalizer
from lit_dreamer.rssm import State
from lit_dreamer.world_model import WorldModel, split_obs_keys

B, T, H = 2, 5, 3
TINY = ModelConfig(deter=32, hidden=8, classes=4, stoch=4, depth=2, units=16, blocks=4)
OBS_SPEC = {"image": ((16, 16, 3), np.uint8), "vector": ((7,), np.float32)}


def make_batch(action_dim=3, discrete=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, action_dim, (B, T), generator=g)
    action = torch.nn.functional.one_hot(actions, action_dim).float() if discrete \
        else torch.rand(B, T, action_dim, generator=g) * 2 - 1
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    return {
        "image": torch.randint(0, 256, (B, T, 16, 16, 3), generator=g, dtype=torch.uint8),
        "vector": torch.randn(B, T, 7, generator=g),
        "action": action,
        "reward": torch.randn(B, T, generator=g),
        "is_first": is_first,
        "is_last": torch.zeros(B, T, dtype=torch.bool),
        "is_terminal": torch.zeros(B, T, dtype=torch.bool),
    }


def make_agent(discrete=True, action_dim=3):
    torch.manual_seed(0)
    wm = WorldModel(OBS_SPEC, action_dim, TINY)
    ac = ActorCritic(wm.rssm.feat_dim, action_dim, discrete, TINY, BehaviorConfig(horizon=H))
    return wm, ac


def test_world_model_shapes_with_image_and_vector():
    wm, _ = make_agent()
    batch = make_batch()
    embed = wm.encode(batch)
    assert embed.shape[:2] == (B, T)
    losses, post, metrics = wm.loss(batch)
    assert set(losses) == {"rec/image", "rec/vector", "rew", "con", "dyn", "rep"}
    for name, value in losses.items():
        assert value.shape == (B, T), name
    assert post.deter.shape == (B, T, 32)
    assert post.stoch.shape == (B, T, 4, 4)
    assert post.feat().shape == (B, T, 32 + 16)
    decoded = wm.decode(post.feat())
    assert decoded["image"].mean().shape == (B, T, 16, 16, 3)
    assert decoded["vector"].mean().shape == (B, T, 7)
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("discrete", [True, False])
def test_imagination_and_losses_shapes(discrete):
    wm, ac = make_agent(discrete)
    batch = make_batch(discrete=discrete)
    _, post, _ = wm.loss(batch)
    start = post.detach().flatten()
    imagination = ac.imagine_loss(wm, start, torch.ones(B * T))
    losses, returns = imagination.losses, imagination.returns
    assert imagination.spread.shape == ()
    assert losses["policy"].shape == (B * T, H)
    assert losses["value"].shape == (B * T, H)
    assert returns.shape == (B * T, H)
    repval = ac.replay_value_loss(post.feat(), batch, returns[:, 0].view(B, T))
    assert repval.shape == (B, T - 1)
    seen = []
    feat = wm.rssm.imagine(start, lambda f: seen.append(f) or ac.actor.dist(ac.actor(f)).sample(), H)
    assert feat.shape == (H + 1, B * T, 32 + 16) and feat.is_contiguous()
    assert torch.equal(feat[0], start.feat())
    assert len(seen) == H and all(torch.equal(f, g) for f, g in zip(seen, feat[:-1]))  # the policy saw states 0..H-1


def test_percentiles_read_the_gathered_returns_and_commit_moves_slow_critic_and_normalizer_together():
    # Under DDP the system sets `gather` to an all-gather: the spread must come from every rank's returns.
    wm, ac = make_agent()
    torch.nn.init.normal_(ac.critic.net.out.weight, std=0.3)  # critic != slow critic, so the EMA moves
    ac.gather = lambda returns: torch.cat([returns.flatten(), returns.flatten() + 50.0])  # a second rank's
    _, post, _ = wm.loss(make_batch())
    imagination = ac.imagine_loss(wm, post.detach().flatten(), torch.ones(B * T))
    both = torch.cat([imagination.returns.flatten(), imagination.returns.flatten() + 50.0])
    torch.testing.assert_close(imagination.spread, ReturnNormalizer().peek(both))
    assert imagination.spread > ReturnNormalizer().peek(imagination.returns)  # the gathered values count
    # Nothing is stored until the update happened.
    slow = [p.clone() for p in ac.slow_critic.parameters()]
    assert ac.normalizer.spread.item() == 0.0
    ac.commit(imagination)
    assert ac.normalizer.spread.item() == imagination.spread.item()
    for before, after, fast in zip(slow, ac.slow_critic.parameters(), ac.critic.parameters()):
        torch.testing.assert_close(after, before + ac.cfg.slow_rate * (fast - before))
    assert any(not torch.equal(a, b) for a, b in zip(slow, ac.slow_critic.parameters()))


def test_the_system_hands_its_all_gather_to_the_actor_critic():
    from lit_dreamer.module import DreamerModule
    module = DreamerModule(OBS_SPEC, 3, True, AgentConfig(model=TINY))
    assert module.actor_critic.gather == module.gather_returns


def test_imagination_feeds_the_dynamics_clipped_continuous_actions_but_scores_the_raw_sample(monkeypatch):
    wm, ac = make_agent(discrete=False)
    # Push the policy's mean to tanh(3) = 0.995 with the widest std: about half the samples exceed 1.
    last = ac.actor.net.out
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([3.0] * 3 + [10.0] * 3))
    fed, scored = [], []
    imagine_step = wm.rssm.imagine_step
    monkeypatch.setattr(wm.rssm, "imagine_step", lambda s, a: fed.append(a) or imagine_step(s, a))
    log_prob = BoundedNormal.log_prob
    monkeypatch.setattr(BoundedNormal, "log_prob", lambda self, x: scored.append(x) or log_prob(self, x))
    _, post, _ = wm.loss(make_batch(discrete=False))
    ac.imagine_loss(wm, post.detach().flatten(), torch.ones(B * T))
    fed, [scored] = torch.stack(fed), scored  # both time-major (H, N, A)
    assert fed.abs().max() == 1.0 and (fed == 1.0).float().mean() > 0.3
    # The log-prob is taken of the raw samples, which the clipped ones equal wherever |a| <= 1.
    assert scored.max() > 1.0
    inside = scored.abs() <= 1
    assert torch.equal(fed[inside], scored[inside])


def test_imagined_rewards_and_continues_line_up_with_the_states_they_arrive_in(monkeypatch):
    """reward_t and cont_t are the heads' predictions at imagined state t (t >= 1); cont_0 is the start's."""
    wm, ac = make_agent()
    torch.nn.init.normal_(wm.reward_head.out.weight, std=0.3)  # the reward head starts at zero
    seen = {}
    monkeypatch.setattr(ac, "behavior_losses", lambda feat, actions, params, reward, cont, task=None: seen.update(
        feat=feat, actions=actions, params=params, reward=reward, cont=cont))
    _, post, _ = wm.loss(make_batch())
    start_cont = torch.tensor([1.0, 0.0]).repeat(B * T // 2)
    ac.imagine_loss(wm, post.detach().flatten(), start_cont)
    feat = seen["feat"]  # time-major
    assert feat.shape[:2] == (H + 1, B * T) and seen["actions"].shape[0] == H and seen["params"].shape[0] == H
    with torch.no_grad():
        torch.testing.assert_close(seen["reward"][1:], wm.reward(feat).mean()[1:])
        torch.testing.assert_close(seen["cont"][1:], wm.cont(feat).mean()[1:])
    assert torch.equal(seen["cont"][0], start_cont)
    assert seen["reward"][1:].abs().sum() > 0


@pytest.mark.parametrize("discrete", [True, False])
def test_behavior_losses_equal_those_computed_on_all_imagined_states(discrete):
    """The last imagined state is only a bootstrap: skipping its unused work changes no loss or gradient."""
    wm, ac = make_agent(discrete)
    g = torch.Generator().manual_seed(3)
    for head in (ac.critic, ac.slow_critic):  # non-zero values, different for critic and slow critic
        head.net.out.weight.data.normal_(0, 0.3, generator=g)
    N = B * T
    feat = torch.randn(N, H + 1, wm.rssm.feat_dim, generator=g)
    params = ac.actor(feat[:, :-1])
    actions = ac.actor.dist(params).sample().detach()
    reward, cont = torch.randn(N, H + 1, generator=g), (torch.rand(N, H + 1, generator=g) > 0.2).float()
    # behavior_losses takes time-major inputs; the reference below is computed batch-major.
    imagination = ac.behavior_losses(feat.transpose(0, 1).contiguous(), actions.transpose(0, 1),
                                     params.transpose(0, 1), reward.T, cont.T)
    losses, metrics, returns = imagination.losses, imagination.metrics, imagination.returns
    assert losses["policy"].shape == losses["value"].shape == returns.shape == (N, H)
    (losses["policy"].mean() + losses["value"].mean()).backward()
    got = [p.grad.clone() for p in (*ac.actor.parameters(), *ac.critic.parameters())]
    ac.zero_grad()
    # Reference: every head on all H+1 states, then the last step dropped (the previous implementation).
    params = ac.actor(feat[:, :-1])
    dist, value_dist = ac.actor.dist(params), ac.critic(feat)
    value, slow = value_dist.mean().detach(), ac.slow_critic(feat).mean().detach()
    discount = ac.cfg.gamma * cont
    weight = torch.cumprod(discount, 1)[:, :-1] / ac.cfg.gamma
    ref_returns = lambda_returns(reward, discount, value, ac.cfg.lam)
    advantage = (ref_returns - value[:, :-1]) / ac.normalizer.scale(ac.normalizer.peek(ref_returns))
    ref = {"policy": actor_loss(dist.log_prob(actions), dist.entropy(), advantage, weight, ac.cfg.entropy),
           "value": critic_loss(TwoHot(value_dist.logits[:, :-1]), ref_returns, slow[:, :-1], weight,
                                ac.cfg.slow_reg)}
    (ref["policy"].mean() + ref["value"].mean()).backward()
    torch.testing.assert_close(returns, ref_returns)
    torch.testing.assert_close(metrics["ac/value"], value.mean())
    for name in ref:
        torch.testing.assert_close(losses[name], ref[name])
    for a, b in zip(got, (p.grad for p in (*ac.actor.parameters(), *ac.critic.parameters()))):
        torch.testing.assert_close(a, b)


def test_is_first_inside_sequence_resets_like_a_fresh_start():
    """A sequence whose step 3 is_first must produce, from step 3 on, exactly what a fresh start does."""
    wm, _ = make_agent()
    batch = make_batch()
    batch["is_first"][:, 3] = True
    batch["action"][:, 3] = 0.0
    embed = wm.encode(batch)
    torch.manual_seed(123)
    post_full, _ = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    # Fresh start from step 3. Latent sampling draws random numbers, so first replay steps 0-2
    # with the same seed to bring the generator to the same state.
    torch.manual_seed(123)
    wm.rssm.observe(embed[:, :3], batch["action"][:, :3], batch["is_first"][:, :3])
    post_tail, _ = wm.rssm.observe(embed[:, 3:], batch["action"][:, 3:], batch["is_first"][:, 3:])
    torch.testing.assert_close(post_full.deter[:, 3:], post_tail.deter, rtol=0, atol=0)
    torch.testing.assert_close(post_full.logits[:, 3:], post_tail.logits, rtol=0, atol=0)
    # A carried start state must not leak through an is_first either.
    garbage = State(torch.randn(B, 32), torch.nn.functional.one_hot(torch.randint(0, 4, (B, 4)), 4).float())
    torch.manual_seed(7)
    a, _ = wm.rssm.observe(embed[:, 3:], batch["action"][:, 3:], batch["is_first"][:, 3:], start=garbage)
    torch.manual_seed(7)
    b, _ = wm.rssm.observe(embed[:, 3:], batch["action"][:, 3:], batch["is_first"][:, 3:])
    torch.testing.assert_close(a.deter, b.deter, rtol=0, atol=0)


def test_start_state_is_used_without_is_first():
    wm, _ = make_agent()
    batch = make_batch()
    batch["is_first"][:] = False
    embed = wm.encode(batch)
    start = State(torch.randn(B, 32), torch.nn.functional.one_hot(torch.randint(0, 4, (B, 4)), 4).float())
    a, _ = wm.rssm.observe(embed, batch["action"], batch["is_first"], start=start)
    b, _ = wm.rssm.observe(embed, batch["action"], batch["is_first"])
    assert not torch.allclose(a.deter[:, 0], b.deter[:, 0])


def grads_of(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


@pytest.mark.parametrize("discrete", [True, False])
def test_actor_and_critic_losses_put_no_gradient_on_the_world_model(discrete):
    wm, ac = make_agent(discrete)
    batch = make_batch(discrete=discrete)
    _, post, _ = wm.loss(batch)
    losses = ac.imagine_loss(wm, post.detach().flatten(), torch.ones(B * T)).losses
    (losses["policy"].mean() + losses["value"].mean()).backward()
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads_of(wm))
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads_of(ac.actor))
    # The critic's output layer starts at zero, so only that layer has a gradient at step 0.
    assert ac.critic.net.out.weight.grad is not None and ac.critic.net.out.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ac.slow_critic.parameters())


def test_replay_value_loss_reaches_the_world_model():
    wm, ac = make_agent()
    batch = make_batch()
    _, post, _ = wm.loss(batch)
    returns = ac.imagine_loss(wm, post.detach().flatten(), torch.ones(B * T)).returns
    # A non-zero critic output layer so that gradients flow back through the critic's trunk.
    torch.nn.init.normal_(ac.critic.net.out.weight, std=0.1)
    ac.replay_value_loss(post.feat(), batch, returns[:, 0].view(B, T)).mean().backward()
    assert wm.rssm.gru.gates.weight.grad is not None and wm.rssm.gru.gates.weight.grad.abs().sum() > 0
    assert wm.vector_encoder.mlp[0][0].weight.grad.abs().sum() > 0
    assert ac.actor.net.out.weight.grad is None


def test_world_model_loss_trains_only_the_world_model():
    wm, ac = make_agent()
    losses, _, _ = wm.loss(make_batch())
    sum(v.mean() for v in losses.values()).backward()
    assert wm.rssm.prior.out.weight.grad.abs().sum() > 0
    assert wm.rssm.post.out.weight.grad.abs().sum() > 0
    assert wm.image_encoder.convs[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in ac.parameters())


def test_output_layer_initialization():
    wm, ac = make_agent()
    assert torch.count_nonzero(wm.reward_head.out.weight) == 0
    assert torch.count_nonzero(ac.critic.net.out.weight) == 0
    torch.manual_seed(0)
    big = ActorCritic(256, 64, True, ModelConfig(units=256, size="size1m"), BehaviorConfig())
    # Fan-in init gives std 1/sqrt(fan_in) (here 1/16); the policy output is scaled by 0.01 on top.
    hidden_std = big.actor.net.trunk[1][0].weight.std().item()
    out_std = big.actor.net.out.weight.std().item()
    assert abs(hidden_std - 1 / 16) < 0.002
    assert abs(out_std - 0.01 / 16) < 0.0001


def test_bounded_normal_std_stays_in_range():
    raw = torch.tensor([-1e4, -10.0, 0.0, 10.0, 1e4])
    dist = BoundedNormal(raw, raw)
    assert dist.std.min() >= 0.1 and dist.std.max() <= 1.0
    assert torch.all(dist.mean().abs() <= 1.0)


def test_block_linear_is_block_diagonal():
    layer = BlockLinear(8, 6, blocks=2, bias=False)
    x = torch.zeros(1, 8)
    x[0, :4] = torch.randn(4)  # only block 0 has input
    y = layer(x)
    assert torch.count_nonzero(y[0, 3:]) == 0 and torch.count_nonzero(y[0, :3]) > 0
    dense = torch.block_diag(*layer.weight)
    torch.testing.assert_close(layer(x), x @ dense)


def test_block_gru_update_gate_keeps_state_when_bias_pushes_it_closed():
    gru = BlockGRU(input_dim=6, deter=16, blocks=4)
    h = torch.randn(3, 16)
    out = gru(torch.randn(3, 6), h)
    assert out.shape == (3, 16)
    with torch.no_grad():
        gru.gates.bias.view(4, 3, -1)[:, 2] = -1e4  # update gate logit -> sigmoid(-inf) = 0
    torch.testing.assert_close(gru(torch.randn(3, 6), h), h)


def test_cnn_encoder_decoder_shapes_for_other_power_of_two_sizes():
    for size in (32, 64, 128):
        enc = ImageEncoder(3, size, depth=2)
        x = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8)
        assert enc(x).shape == (2, enc.out_dim)
        dec = ImageDecoder(10, 3, size, depth=2)
        out = dec(torch.randn(2, 10))
        assert out.shape == (2, size, size, 3) and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match="power of two"):
        ImageEncoder(3, 48, depth=2)


@pytest.mark.parametrize("strided, kernel, mults", [(True, 4, (1, 2, 4, 8)), (True, 5, (2, 3, 4, 4)),
                                                    (False, 4, (2, 3, 4, 4)), (True, 3, (1, 2, 4))])
def test_cnn_options_keep_the_shapes_and_strided_stages_do_not_pool(strided, kernel, mults):
    enc = ImageEncoder(3, 32, depth=2, mults=mults, kernel=kernel, strided=strided)
    dec = ImageDecoder(10, 3, 32, depth=2, mults=mults, kernel=kernel, strided=strided)
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    min_size = 32 // 2 ** len(mults)
    assert enc.out_dim == 2 * mults[-1] * min_size ** 2 and enc(x).shape == (2, enc.out_dim)
    assert dec(torch.randn(2, 10)).shape == (2, 32, 32, 3)
    assert all(c.kernel_size == (kernel, kernel) for c in [*enc.convs, *dec.convs])
    # Strided: every encoder conv halves the size itself, every decoder conv is transposed and doubles it.
    assert all(c.stride == ((2, 2) if strided else (1, 1)) for c in enc.convs)
    assert all(isinstance(c, torch.nn.ConvTranspose2d) == strided for c in dec.convs)
    # The first stage's output: the strided conv makes the half-size map by itself.
    first = enc.convs[0](x.permute(0, 3, 1, 2).float())
    assert first.shape[-1] == (16 if strided else 32)


def test_observation_key_selection_and_errors():
    spec = {"cam": ((8, 8, 3), np.uint8), "joints": ((5,), np.float32), "reward": ((), np.float32)}
    assert split_obs_keys(spec) == (["cam"], ["joints"], [])
    assert split_obs_keys(spec, cnn_keys="nothing") == ([], ["joints"], [])
    with pytest.raises(ValueError, match="'grid'.*cannot be encoded"):
        split_obs_keys({"grid": ((4, 4), np.float32)})
    with pytest.raises(ValueError, match="no observation key matches"):
        split_obs_keys(spec, cnn_keys="x", mlp_keys="y")


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_size_presets_build_and_grow():
    counts = []
    for name in ("size1m", "size12m"):
        cfg = ModelConfig(size=name).resolved()
        assert cfg.deter == SIZES[name]["deter"]
        wm = WorldModel({"vector": ((4,), np.float32)}, 2, cfg)
        counts.append(count(wm))
    assert counts[0] < counts[1]
    with pytest.raises(ValueError, match="unknown model.size"):
        ModelConfig(size="size3m").resolved()


def test_module_config_round_trips_through_plain_dicts():
    from dataclasses import asdict

    from lit_dreamer.module import agent_config_from
    cfg = AgentConfig(model=ModelConfig(size="size12m", units=32))
    assert agent_config_from(asdict(cfg)) == cfg


@pytest.mark.parametrize("dense_bias", [False, True])
def test_dense_bias_decides_whether_the_dynamics_see_an_actions_magnitude(dense_bias):
    # RMSNorm divides out the scale of Linear(x) when the Linear has no bias, so a 1-dim action
    # reaches the GRU as its sign only: 0.3 and 0.9 give the same next state. With a bias (set
    # away from its zero init, as training does) they differ.
    from dataclasses import replace
    torch.manual_seed(0)
    wm = WorldModel({"vector": ((5,), np.float32)}, 1, replace(TINY, dense_bias=dense_bias))
    linears = [m for m in wm.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert (wm.rssm.action_proj[0].bias is not None) == dense_bias
    assert (wm.vector_encoder.mlp[0][0].bias is not None) == dense_bias
    with torch.no_grad():
        for layer in linears:
            layer.bias.normal_()
    state = State(torch.randn(1, 32), torch.nn.functional.one_hot(torch.randint(0, 4, (1, 4)), 4).float())
    small, large = (wm.rssm.sequence_step(state, torch.tensor([[a]])) for a in (0.3, 0.9))
    embed_small, embed_large = (wm.vector_encoder(torch.full((1, 5), v)) for v in (0.3, 0.9))
    # Without a bias the only difference left is RMSNorm's epsilon (1e-4 against a mean square of ~0.1).
    gap, embed_gap = (small - large).abs().max(), (embed_small - embed_large).abs().max()
    if dense_bias:
        assert gap > 0.02 and embed_gap > 0.02, (gap, embed_gap)
    else:
        assert gap < 1e-3 and embed_gap < 1e-3, (gap, embed_gap)


def test_checkpoint_check_reads_a_key_the_checkpoint_predates_as_it_was_made(tmp_path):
    # dense_bias was added (off) after the first release and is now on by default: a checkpoint without
    # the key has no biases, so it must read as False, not as today's default.
    from dataclasses import replace

    from lit_dreamer.config import ConfigError
    from lit_dreamer.module import DreamerModule
    from lit_dreamer.train import check_checkpoint_matches
    spec = {"vector": ((5,), np.float32)}
    legacy = replace(TINY, dense_bias=False)
    old = DreamerModule(spec, 1, False, AgentConfig(model=legacy))
    hparams = dict(old.hparams)
    hparams["config"] = {**hparams["config"], "model": {k: v for k, v in hparams["config"]["model"].items()
                                                        if k != "dense_bias"}}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams}, path)
    check_checkpoint_matches(str(path), DreamerModule(spec, 1, False, AgentConfig(model=legacy)))
    with pytest.raises(ConfigError, match="model.dense_bias: checkpoint False vs requested True.*"
                                          "set model.dense_bias=false"):
        check_checkpoint_matches(str(path), DreamerModule(spec, 1, False, AgentConfig(model=TINY)))
    hparams["config"]["model"]["wider_gru"] = True  # written by a version with a key this one lacks
    torch.save({"hyper_parameters": hparams}, path)
    with pytest.raises(ConfigError, match="keys this version does not know: wider_gru"):
        check_checkpoint_matches(str(path), DreamerModule(spec, 1, False, AgentConfig(model=legacy)))


def test_a_fresh_config_has_dense_bias_and_the_decoder_projection_norm():
    from lit_dreamer.config import load_config
    for model in (ModelConfig(), load_config().model):  # the dataclass and configs/defaults.yaml
        assert model.dense_bias is True and model.decoder_projection_norm is True
    wm = WorldModel(OBS_SPEC, 3, TINY)
    assert wm.rssm.action_proj[0].bias is not None and wm.vector_encoder.mlp[0][0].bias is not None
    assert wm.image_decoder.project.bias is not None and wm.image_decoder.project_norm is not None


@pytest.mark.parametrize("projection_norm", [False, True])
def test_image_decoder_projection_is_a_normalized_hidden_layer(projection_norm):
    # Golden: the map the first upsample + conv reads is SiLU(RMSNorm over channels(Linear(feat))) with the
    # norm on, and the bare Linear (linear in feat, so it composes with the conv into one map) with it off.
    torch.manual_seed(0)
    dec = ImageDecoder(6, 3, 32, depth=2, projection_norm=projection_norm)
    assert (dec.project_norm is not None) == projection_norm
    with torch.no_grad():
        if projection_norm:
            dec.project_norm.weight.uniform_(0.5, 1.5)  # away from its ones init, so the scale is checked
    seen = {}
    dec.convs[0].register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    feat = torch.randn(5, 6)
    dec(feat)
    x = dec.project(feat).view(5, 8, 2, 2)  # C_last = depth * 4, S/16 = 2
    if projection_norm:
        weight = dec.project_norm.weight.view(1, 8, 1, 1)
        x = F.silu(x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-4) * weight)
    torch.testing.assert_close(seen["x"], F.interpolate(x, scale_factor=2, mode="nearest"))
    if projection_norm:  # and gradients reach the norm's scale and the projection through it
        dec(feat).square().sum().backward()
        for grad in (dec.project_norm.weight.grad, dec.project.weight.grad):
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_pixel_checkpoint_from_before_the_new_keys_loads_and_behaves_as_made(tmp_path):
    # Written without dense_bias and decoder_projection_norm in its hparams: rebuilt as eval and
    # Lightning's load_from_checkpoint rebuild it (from the saved hparams), it has neither, and its
    # weights load strictly; today's defaults would need parameters it does not hold.
    from dataclasses import asdict, replace

    import lightning as L

    from lit_dreamer.module import DreamerModule
    torch.manual_seed(0)
    legacy = replace(TINY, dense_bias=False, decoder_projection_norm=False)
    old = DreamerModule(OBS_SPEC, 2, False, AgentConfig(model=legacy))
    hparams = dict(old.hparams)
    hparams["config"] = {**hparams["config"], "model": {k: v for k, v in hparams["config"]["model"].items()
                                                        if k not in ("dense_bias", "decoder_projection_norm")}}
    path = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": old.state_dict(),
                "pytorch-lightning_version": L.__version__}, path)
    ckpt = torch.load(path, weights_only=True)
    rebuilt = DreamerModule(OBS_SPEC, 2, False, ckpt["hyper_parameters"]["config"])  # what eval does
    loaded = DreamerModule.load_from_checkpoint(path, weights_only=True)
    feat = torch.randn(3, old.world_model.rssm.feat_dim)
    for module in (rebuilt, loaded):
        assert module.cfg.model == legacy
        assert module.world_model.image_decoder.project_norm is None
        assert module.world_model.rssm.action_proj[0].bias is None
        module.load_state_dict(ckpt["state_dict"])  # strict: every parameter there, none extra
        torch.testing.assert_close(module.world_model.image_decoder(feat), old.world_model.image_decoder(feat))
    with pytest.raises(RuntimeError, match="project_norm.weight"):
        DreamerModule(OBS_SPEC, 2, False, AgentConfig(model=TINY)).load_state_dict(ckpt["state_dict"])
    assert asdict(rebuilt.cfg) == asdict(loaded.cfg)


def test_every_lightning_hook_the_module_overrides_is_marked_override():
    import lightning as L

    from lit_dreamer.module import DreamerModule
    hooks = [name for name, value in vars(DreamerModule).items()
             if callable(value) and not name.startswith("__") and hasattr(L.LightningModule, name)]
    assert {"configure_optimizers", "training_step", "on_train_batch_end"} <= set(hooks)
    assert [name for name in hooks if not getattr(vars(DreamerModule)[name], "__override__", False)] == []


def test_a_checkpoint_and_run_config_from_before_free_nats_moved_load_with_its_value(tmp_path):
    # Made as the code before the move saved it: free_nats under `behavior` in the checkpoint's hyperparameters
    # and in the run's config.yaml. A non-default value, so that falling back to the default would show.
    from dataclasses import asdict, replace

    import lightning as L
    import yaml

    from lit_dreamer.config import Config, to_flat_dict
    from lit_dreamer.evaluation import load_module
    from lit_dreamer.module import DreamerModule
    from lit_dreamer.train import check_checkpoint_matches
    agent = AgentConfig(model=TINY, world_model=replace(AgentConfig().world_model, free_nats=0.5))
    new = DreamerModule(OBS_SPEC, 2, False, agent)
    hparams = dict(new.hparams)
    old_config = {k: dict(v) for k, v in hparams["config"].items() if k != "world_model"}
    old_config["behavior"]["free_nats"] = 0.5
    hparams["config"] = old_config
    folder = tmp_path / "runs" / "old" / "checkpoints" / "step-000000000010"
    folder.mkdir(parents=True)
    path = folder / "model.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": new.state_dict(),
                "pytorch-lightning_version": L.__version__}, path)
    run_config = asdict(Config(model=TINY))
    del run_config["world_model"]
    run_config["behavior"]["free_nats"] = 0.5
    (tmp_path / "runs" / "old" / "config.yaml").write_text(yaml.safe_dump(run_config))

    evaluated, cfg = load_module(str(path))  # what `eval` does
    loaded = DreamerModule.load_from_checkpoint(path, weights_only=True)
    for module in (evaluated, loaded):
        assert module.cfg == agent and module.world_model.free_nats == 0.5
    assert cfg.world_model.free_nats == 0.5 and "behavior.free_nats" not in to_flat_dict(cfg)
    check_checkpoint_matches(str(path), new)  # resuming it: the moved key is no model mismatch

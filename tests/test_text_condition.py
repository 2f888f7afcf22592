"""`model.text_condition` (issue 23): the instruction's text embedding as the conditioning vector of the
reward and continue heads, actor and critics (lit_dreamer.conditioning.with_vector), carried with each
imagined start; the actor and critics read it without gradient, the world model's heads with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lit_dreamer.agent_config import AgentConfig, ModelConfig
from lit_dreamer.conditioning import with_vector
from lit_dreamer.module import DreamerModule
from lit_dreamer.world_model import WorldModel
from tests.test_system import explain, fit_cli, history, only_run
from tests.test_text import SPEC, TINY, text_batch
from tests.text_envs import TEXT_ENV

CONDITIONED = ModelConfig(**{**TINY.__dict__, "text_condition": True})


def module(model: ModelConfig = CONDITIONED, num_tasks: int = 1) -> DreamerModule:
    torch.manual_seed(0)
    return DreamerModule(SPEC, 2, True, AgentConfig(model=model), num_tasks=num_tasks)


def first_layer_inputs(head) -> int:
    return head.trunk[0][0].weight.shape[1]


def test_with_vector_appends_and_broadcasts_over_leading_steps():
    feat, vector = torch.zeros(4, 3, 5), torch.arange(6.0).view(3, 2)
    out = with_vector(feat, vector)
    assert out.shape == (4, 3, 7)
    torch.testing.assert_close(out[2, :, 5:], vector)
    assert with_vector(feat, None) is feat


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_every_task_dependent_head_reads_the_features_and_the_text_vector(num_tasks):
    plain, conditioned = module(TINY, num_tasks), module(CONDITIONED, num_tasks)
    width = conditioned.world_model.text_encoders[0].out_dim
    assert conditioned.cond.vector_dim == width and plain.cond.vector_dim == 0
    heads = lambda m: [m.world_model.reward_head, m.world_model.cont_head, m.actor_critic.actor.net,
                       m.actor_critic.critic.net, m.actor_critic.slow_critic.net]
    for p, c in zip(heads(plain), heads(conditioned)):
        assert first_layer_inputs(c) == first_layer_inputs(p) + width
    # The decoder reads the latent alone: the same parameters with or without the condition.
    decoder = lambda m: {k: v.shape for k, v in m.world_model.state_dict().items() if "decoder" in k}
    assert decoder(plain) == decoder(conditioned)


def test_the_continue_loss_trains_the_heads_vector_columns():
    """(The reward head's output layer starts at zero, so at initialization no gradient passes its trunk.)"""
    wm = module().world_model
    losses, _, _ = wm.loss(text_batch())
    losses["con"].mean().backward()
    first = wm.cont_head.trunk[0][0].weight.grad
    assert first[:, wm.rssm.feat_dim:].abs().sum() > 0  # the vector's columns learn


def test_imagination_carries_each_starts_vector_through_the_horizon():
    m = module()
    batch = text_batch(B=2, T=3)
    _, post, _ = m.world_model.loss(batch)
    vector = m.world_model.condition_vector(batch).detach().flatten(0, 1)  # (6, D)
    feat, _ = m.actor_critic.rollout(m.world_model, post.detach().flatten(), None, vector)
    F = m.world_model.rssm.feat_dim
    assert feat.shape == (m.cfg.behavior.horizon + 1, 6, F + vector.shape[-1])
    torch.testing.assert_close(feat[..., F:], vector[None].expand(feat.shape[0], -1, -1))


def test_the_actor_and_critic_losses_do_not_reach_the_text_encoder_but_the_world_models_do():
    """Given the vector as the training step computes it (under no_grad), the actor's and critics' losses leave
    the text encoder without gradient while training their own vector columns; the world model's losses reach it."""
    m = module()
    batch = text_batch()
    wm_losses, post, _ = m.world_model.loss(batch)
    with torch.no_grad():
        vector = m.world_model.condition_vector(batch)
    imagination = m.actor_critic.imagine_loss(m.world_model, post.detach().flatten(), torch.ones(6), None,
                                              vector.flatten(0, 1))
    (imagination.losses["policy"].mean() + imagination.losses["value"].mean()).backward(retain_graph=True)
    encoder = m.world_model.text_encoders[0].embedding.weight
    assert encoder.grad is None or encoder.grad.abs().sum() == 0
    assert m.actor_critic.actor.net.trunk[0][0].weight.grad[:, m.world_model.rssm.feat_dim:].abs().sum() > 0
    wm_losses["con"].mean().backward()
    assert encoder.grad.abs().sum() > 0


def test_the_policy_reads_the_instruction_directly():
    """Two observations that differ only in the instruction, from the same latent state: the conditioned
    actor's action distributions differ even where the latent is held fixed."""
    m = module()
    m.eval()
    ids = [torch.tensor([[2, 3, 0, 0, 0, 0, 0, 0]]), torch.tensor([[2, 4, 0, 0, 0, 0, 0, 0]])]
    vectors = [m.world_model.condition_vector({"vector": torch.zeros(1, 1, 2), "mission": i[:, None]})[:, 0]
               for i in ids]
    feat = torch.zeros(1, m.world_model.rssm.feat_dim)
    actor = m.actor_critic.actor
    probs = [actor.dist(actor(with_vector(feat, v))).mean() for v in vectors]
    assert not torch.allclose(probs[0], probs[1])
    # And `act`, the collector's and evaluation's path, gives the actor that vector.
    obs = {"vector": torch.zeros(1, 2), "mission": ids[0]}
    action, _, _ = m.act(obs, torch.ones(1, dtype=torch.bool), m.initial_carry(1), mode="mode")
    assert action.shape == (1, 2)


def test_text_condition_without_a_text_key_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="model.text_condition needs a text observation key.*text_condition=false"):
        WorldModel({"vector": ((3,), np.float32)}, 2, CONDITIONED)


@pytest.mark.timeout(300)
def test_a_cli_fit_with_text_condition_trains_and_evaluates(tmp_path):
    proc = fit_cli(tmp_path, f"env.id={TEXT_ENV}", "run.steps=100", "run.prefill=60", "env.text_length=6",
                   "model.text_condition=true", "run.eval_every=100", "run.eval_episodes=2")
    assert proc.returncode == 0, explain(proc)
    run = only_run(tmp_path)
    assert history(tmp_path, run.info.run_id, "loss/rew")
    assert history(tmp_path, run.info.run_id, "eval/return")
    assert run.data.params["model.text_condition"] == "True"

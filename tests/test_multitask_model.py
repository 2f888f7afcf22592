"""Many tasks, one world model: the model side (issue 22, part 2).

Task conditioning of the reward and continue heads, actor and critics (`multitask.conditioning` embedding or
heads), each task's rows trained by its own samples only, the world model's encoder, RSSM and decoder blind to
the task, imagination carrying each start's task, one return scale per task, the one-task agent unchanged,
checkpoints that rebuild the same shapes, and adaptation from a checkpoint (`init.ckpt`, `init.freeze`).
"""

import hashlib
import os
from dataclasses import replace
import subprocess
import sys

import mlflow
import pytest
import torch

import lit_dreamer.train as train_module
from lit_dreamer.agent_config import AgentConfig, BehaviorConfig, ModelConfig, MultitaskConfig
from lit_dreamer.conditioning import (ConditionedHead, Conditioning, TaskEmbedding, TaskLinear, task_blocks,
                                      task_indexed)
from lit_dreamer.config import ConfigError, load_config, task_metric_name
from lit_dreamer.evaluation import load_checkpoint
from lit_dreamer.module import DreamerModule
from lit_dreamer.normalizer import ReturnNormalizer
from lit_dreamer.train import fit

POINT = "lit_dreamer/PointGoal-{}-v0"
TINY = ModelConfig(deter=32, hidden=8, classes=4, stoch=4, depth=2, units=16, blocks=4)
OBS = {"vector": ((5,), "float32")}
MODES = ("embedding", "heads")


def make_module(num_tasks=1, mode="embedding", horizon=3, seed=0, task_names=None):
    torch.manual_seed(seed)
    cfg = AgentConfig(model=TINY, behavior=BehaviorConfig(horizon=horizon), multitask=MultitaskConfig(conditioning=mode))
    return DreamerModule(OBS, 2, False, cfg, num_tasks=num_tasks, task_names=task_names)


def seeded_batch(B=3, T=6, task=None):
    g = torch.Generator().manual_seed(1)
    first = torch.zeros(B, T, dtype=torch.bool)
    first[:, 0] = True
    batch = {"vector": torch.randn(B, T, 5, generator=g), "action": torch.rand(B, T, 2, generator=g) * 2 - 1,
             "reward": torch.randn(B, T, generator=g), "is_first": first,
             "is_last": torch.zeros(B, T, dtype=torch.bool), "is_terminal": torch.zeros(B, T, dtype=torch.bool)}
    if task is not None:
        batch["task"] = torch.as_tensor(task, dtype=torch.long)[:, None].expand(B, T).contiguous()
    return batch


def step_losses(module, batch):
    """The three phases of DreamerModule.training_step (without the Trainer): losses by name, and the imagination."""
    B, T = batch["is_first"].shape
    task = module.task_of(batch)
    wm = {k: v for k, v in batch.items() if k != "task"}
    losses, post, _ = module.world_model.loss(wm, None, task)
    start_task = None if task is None else task.flatten()
    imagination = module.actor_critic.imagine_loss(module.world_model, post.detach().flatten(), torch.ones(B * T),
                                                   start_task)
    repval = module.actor_critic.replay_value_loss(post.feat(), batch, imagination.returns[:, 0].view(B, T))
    return {k: v.mean() for k, v in {**losses, **imagination.losses, "repval": repval}.items()}, imagination, post


def perturb_output_layers(module):
    """The reward and critic heads start at zero output (and so pass no gradient to what is before them)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".out." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


# --------------------------------------------------------------------------------------------------
# One task: the agent of before, unchanged

# Made by main's code at b216788 (before task conditioning) with `one_task_fingerprint` below: the state-dict
# layout (names and shapes), the parameters, and the losses of three seeded LaProp steps.
ONE_TASK_GOLDEN = {
    "layout": "f9ade1ec2e5289d3", "params": 24375, "param_sum": 319.3885155990756,
    "0/rec/vector": 3.6270272731781006, "0/rew": 5.541263580322266, "0/con": 0.7420600056648254, "0/dyn": 1.0,
    "0/rep": 1.0, "0/policy": -0.0004645583394449204, "0/value": 6.57462215423584, "0/repval": 11.082525253295898,
    "1/rec/vector": 3.615795612335205, "1/rew": 5.541263580322266, "1/con": 0.9482322335243225,
    "1/dyn": 1.015067219734192, "1/rep": 1.015067219734192, "1/policy": -0.0004352724936325103,
    "1/value": 6.1602783203125, "1/repval": 11.082525253295898,
    "2/rec/vector": 3.4844887256622314, "2/rew": 5.541263103485107, "2/con": 0.9026221036911011, "2/dyn": 1.0,
    "2/rep": 1.0, "2/policy": -0.00045831824536435306, "2/value": 6.485573768615723, "2/repval": 11.082524299621582,
    "spread": 1.647948721927861e-10,
}


def one_task_fingerprint(module) -> dict:
    state = module.state_dict()
    layout = hashlib.sha256(";".join(f"{k}:{tuple(v.shape)}" for k, v in state.items()).encode()).hexdigest()[:16]
    out = {"layout": layout, "params": sum(p.numel() for p in module.parameters()),
           "param_sum": float(sum(v.double().sum() for v in state.values() if v.is_floating_point()))}
    optimizers = module.configure_optimizers()
    batch = seeded_batch()
    torch.manual_seed(2)
    for step in range(3):
        losses, imagination, _ = step_losses(module, batch)
        out.update({f"{step}/{k}": float(v.detach()) for k, v in losses.items()})
        for opt in optimizers:
            opt.zero_grad()
        sum(losses.values()).backward()
        for opt in optimizers:
            opt.step()
        module.actor_critic.commit(imagination)
    out["spread"] = float(module.actor_critic.normalizer.spread)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_one_task_agent_has_the_layout_parameters_and_losses_of_before(mode):
    """Either conditioning mode with one task builds the one-task agent: same state-dict names and shapes (so
    its old checkpoints load), same initial values (no extra random draws), same losses over three steps."""
    got = one_task_fingerprint(make_module(num_tasks=1, mode=mode))
    assert got["layout"] == ONE_TASK_GOLDEN["layout"] and got["params"] == ONE_TASK_GOLDEN["params"]
    for key, value in ONE_TASK_GOLDEN.items():
        if key != "layout":
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key


def test_one_task_agent_ignores_a_task_it_is_given():
    module = make_module(num_tasks=1)
    torch.manual_seed(5)
    without, _, _ = step_losses(module, seeded_batch())
    torch.manual_seed(5)
    given, _, _ = step_losses(module, seeded_batch(task=[0, 0, 0]))
    assert all(torch.equal(without[k], given[k]) for k in without)
    assert module.actor_critic.normalizer.spread.shape == ()  # the one-task state dict's shape


# --------------------------------------------------------------------------------------------------
# Building blocks


def test_task_embedding_caps_the_norm_and_task_linear_picks_each_task_layer():
    embedding = TaskEmbedding(3, 4)
    with torch.no_grad():
        embedding.rows.copy_(torch.tensor([[3.0, 4, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 2]]))
    vectors = embedding(torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(vectors, torch.tensor([[0.6, 0.8, 0, 0], [0.3, 0.4, 0, 0], [0, 0, 0, 1], [0.6, 0.8, 0, 0]]))
    layer = TaskLinear(4, 2, num_tasks=3)
    x, task = torch.randn(5, 4), torch.tensor([2, 0, 1, 1, 0])
    expected = torch.stack([x[i] @ layer.weight[k].T + layer.bias[k] for i, k in enumerate(task.tolist())])
    torch.testing.assert_close(layer(x, task), expected)


def every_task_then_pick(layer, x, task):
    """TaskLinear as it was first written: every task's layer on every input, then the task's output picked."""
    outs = torch.einsum("...i,koi->...ko", x, layer.weight) + layer.bias  # (..., K, out)
    return outs.gather(-2, task[..., None, None].expand(*task.shape, 1, outs.shape[-1])).squeeze(-2)


TASK_ORDERS = {"shuffled": lambda g: torch.randint(0, 4, (7, 6), generator=g),
               "task 1 absent": lambda g: torch.tensor([0, 2, 3])[torch.randint(0, 3, (7, 6), generator=g)],
               "last task absent": lambda g: torch.randint(0, 3, (7, 6), generator=g),
               "all task 2": lambda g: torch.full((7, 6), 2),
               "one input": lambda g: torch.tensor([3])}


@pytest.mark.parametrize("out_dim", [3, 40])  # the narrow layer's path (every task's layer) and the blocks'
@pytest.mark.parametrize("order", TASK_ORDERS)
def test_task_linear_gives_the_outputs_and_gradients_of_every_tasks_layer_then_pick(order, out_dim):
    assert (3 * out_dim > TaskLinear.EVERY_TASK_MAX_EXTRA) == (out_dim == 40)  # both paths covered (K = 4)
    g = torch.Generator().manual_seed(0)
    layer = TaskLinear(5, out_dim, num_tasks=4)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    task = TASK_ORDERS[order](g)
    x = torch.randn(*task.shape, 5, generator=g, requires_grad=True)
    upstream = torch.randn(*task.shape, out_dim, generator=g)
    inputs = [x, layer.weight, layer.bias]
    got = layer(x, task)
    want = every_task_then_pick(layer, x, task)
    torch.testing.assert_close(got, want)
    for name, got_grad, want_grad in zip(("x", "weight", "bias"), torch.autograd.grad((got * upstream).sum(), inputs),
                                         torch.autograd.grad((want * upstream).sum(), inputs)):
        torch.testing.assert_close(got_grad, want_grad, msg=name)


@pytest.mark.parametrize("out_dim", [3, 40])
def test_task_linear_gives_no_gradient_to_a_task_without_samples(out_dim):
    layer = TaskLinear(5, out_dim, num_tasks=4)
    task = torch.tensor([0, 2, 2, 0, 2, 0, 0])  # no sample of task 1 nor of task 3, whose rows pad the last blocks
    layer(torch.randn(7, 5), task).square().sum().backward()
    for param in (layer.weight, layer.bias):
        assert torch.equal(param.grad[[1, 3]], torch.zeros_like(param.grad[[1, 3]]))
        assert param.grad[0].abs().sum() > 0 and param.grad[2].abs().sum() > 0


def test_task_blocks_lay_each_tasks_rows_out_in_blocks_of_their_own():
    task = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    slot, block_task = task_blocks(task, num_tasks=4, block_size=2)
    # Task 0's rows fill block 0, task 1's block 1, task 2's blocks 2 and 3 (one slot left empty); the
    # ceil(7 / 2) + 4 - 1 = 7 blocks end with padding blocks, given to the last task.
    assert slot.tolist() == [4, 0, 2, 3, 1, 5, 6]
    assert block_task.tolist() == [0, 1, 2, 2, 3, 3, 3]


def test_task_linear_costs_one_layer_whatever_the_number_of_tasks():
    """FLOPs (a count, not a timing) of forward and backward: one (N, in) x (in, out) product each for the
    output, the input gradient and the weight gradient, plus the blocks' padding, instead of K times that."""
    from torch.utils.flop_counter import FlopCounterMode
    N, in_dim, out_dim = 1000, 32, 64
    layer = TaskLinear(in_dim, out_dim, num_tasks=4)
    x, task = torch.randn(N, in_dim, requires_grad=True), torch.randint(0, 4, (N,))
    with FlopCounterMode(display=False) as counter:
        layer(x, task).square().sum().backward()
    one_layer = 3 * 2 * N * in_dim * out_dim
    assert one_layer <= counter.get_total_flops() <= 1.1 * one_layer


def test_task_linear_needs_no_host_device_sync():
    """Traced as one graph: a count read on the host (bincount().tolist() to split the rows by task) would
    break it. The stand-in for a GPU's sync on a CPU-only test machine."""
    layer = TaskLinear(8, 40, num_tasks=4)
    traced = torch.compile(layer, backend="eager", fullgraph=True, dynamic=False)
    x, task = torch.randn(6, 5, 8), torch.randint(0, 4, (6, 5))
    torch.testing.assert_close(traced(x, task), layer(x, task))

def test_per_task_return_normalizer_takes_each_tasks_own_percentiles():
    g = torch.Generator().manual_seed(0)
    returns = torch.cat([torch.rand(200, generator=g), 100 * torch.rand(200, generator=g)])
    task = torch.cat([torch.zeros(200, dtype=torch.long), torch.full((200,), 2)])  # task 1 has no returns here
    normalizer = ReturnNormalizer(rate=0.5, num_tasks=3)
    normalizer.spread.fill_(4.0)
    spread = normalizer.peek(returns, task)
    for k, own in ((0, returns[:200]), (2, returns[200:])):
        alone = ReturnNormalizer(rate=0.5)
        alone.spread.fill_(4.0)
        torch.testing.assert_close(spread[k], alone.peek(own))  # each task: the one-task EMA of its own returns
    assert spread[1] == 4.0  # a task without returns keeps its scale
    assert spread[2] > 10 * spread[0]  # one scale over both tasks would fit neither


def test_advantages_are_divided_by_their_tasks_scale():
    module = make_module(num_tasks=2, mode="heads")
    ac = module.actor_critic
    ac.normalizer.spread.copy_(torch.tensor([1.0, 50.0]))
    ac.normalizer.rate = 0.0  # the scales stay as set, so the advantages can be recomputed from them
    H, N = 3, 4
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(H + 1, N, module.world_model.rssm.feat_dim, generator=g)
    task = torch.tensor([0, 1, 0, 1])[None].expand(H + 1, N)
    params = ac.actor(feat[:-1], task[:-1])
    actions = ac.actor.dist(params).sample()
    reward = 10 * torch.randn(H + 1, N, generator=g)
    imagination = ac.behavior_losses(feat, actions, params, reward, torch.ones(H + 1, N), task)
    value = ac.critic(feat, task).mean()
    expected = (imagination.returns.T - value[:-1]) / torch.tensor([1.0, 50.0])[task[:-1]]
    torch.testing.assert_close(imagination.metrics["ac/advantage"], expected.mean())
    assert torch.equal(imagination.task, torch.tensor([0, 1, 0, 1]))


def logged_by_one_training_step(module):
    """The metrics DreamerModule.training_step logs in one step under a Trainer (one seeded batch)."""
    import lightning as L
    logged = {}
    original = module.log_metrics
    module.log_metrics = lambda metrics: (logged.update(metrics), original(metrics))
    task = [0, 1, 1] if module.cond.active else None
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # 3 optimizers: 3 global steps per step
    batches = torch.utils.data.DataLoader([seeded_batch(task=task)], batch_size=None)  # as built, no collation
    trainer.fit(module, train_dataloaders=batches)
    return logged


def test_each_tasks_return_scale_is_logged_under_its_name():
    module = make_module(num_tasks=2, task_names=[POINT.format(0), POINT.format(1)])
    assert module.task_labels == ["lit_dreamer_PointGoal-0-v0", "lit_dreamer_PointGoal-1-v0"]  # as eval/<task>/return
    module.actor_critic.normalizer.spread.copy_(torch.tensor([3.0, 7.0]))  # above the floor of 1, and apart
    logged = logged_by_one_training_step(module)
    scale = module.actor_critic.normalizer.scale()  # (2,): committed after the step, the scale the step used
    assert 2.9 < scale[0] < 3.1 and 6.9 < scale[1] < 7.1
    names = [f"ac/{name}/return_scale" for name in module.task_labels]
    assert sorted(k for k in logged if "return_scale" in k) == sorted(["ac/return_scale", *names])
    for k, name in enumerate(names):
        assert float(logged[name]) == float(scale[k])
    torch.testing.assert_close(logged["ac/return_scale"], scale.mean())  # the mean, as before


def test_task_scale_metrics_are_named_by_task_name_or_index_and_absent_with_one_task(tmp_path):
    from lit_dreamer.module import task_labels
    assert task_labels(2, [POINT.format(0), "dmc/cartpole-balance"]) == ["lit_dreamer_PointGoal-0-v0",
                                                                        "dmc_cartpole-balance"]
    assert task_labels(2, None) == ["0", "1"]  # a module built without the names (a script)
    two_tasks = load_config(["debug"], [f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]", "logger.backend=none",
                                        f"run.dir={tmp_path}/run"])
    assert train_module.build(two_tasks)[0].task_labels == [task_metric_name(POINT.format(k)) for k in (0, 1)]
    logged = logged_by_one_training_step(make_module(num_tasks=1))
    assert [k for k in logged if "return_scale" in k] == ["ac/return_scale"]


# --------------------------------------------------------------------------------------------------
# Contracts with several tasks


@pytest.mark.parametrize("mode", MODES)
def test_each_tasks_rows_get_gradient_only_from_its_own_samples(mode):
    module = make_module(num_tasks=3, mode=mode)
    perturb_output_layers(module)
    losses, _, _ = step_losses(module, seeded_batch(task=[0, 0, 2]))  # no sample of task 1
    sum(losses.values()).backward()
    indexed = {name: p for name, p in module.named_parameters() if task_indexed(name, module.cond) and p.requires_grad}
    heads = {name.rsplit(".", 2)[0] for name in indexed}
    assert heads == {"world_model.reward_head", "world_model.cont_head", "actor_critic.actor.net",
                     "actor_critic.critic.net"}  # (the slow critic has no gradient at all)
    for name, param in indexed.items():
        assert param.grad is not None, name
        assert torch.equal(param.grad[1], torch.zeros_like(param.grad[1])), f"{name}: task 1 got gradient"
        assert param.grad[0].abs().sum() > 0 and param.grad[2].abs().sum() > 0, name


@pytest.mark.parametrize("mode", MODES)
def test_the_world_models_encoder_rssm_and_decoder_see_no_task(mode):
    """Spy: no task tensor reaches them; and the task changes the reward and continue predictions only."""
    module = make_module(num_tasks=2, mode=mode)
    perturb_output_layers(module)
    wm = module.world_model
    seen = []

    def spy(_module, args, kwargs):
        values = [*args, *kwargs.values()]
        values += [v for a in values if isinstance(a, dict) for v in a.values()]
        seen.append([v for v in values if torch.is_tensor(v) and not v.is_floating_point() and v.dtype != torch.bool])
        assert not any(isinstance(a, dict) and "task" in a for a in args)

    shared = [m for name, m in wm.named_children() if name not in ("reward_head", "cont_head")]
    assert {"rssm", "vector_encoder", "vector_decoder"} <= {n for n, _ in wm.named_children()}
    for child in shared:
        for sub in child.modules():
            sub.register_forward_pre_hook(spy, with_kwargs=True)
    results = {}
    for task in (0, 1):
        torch.manual_seed(7)
        losses, _, post = step_losses(module, seeded_batch(task=[task] * 3))
        results[task] = (losses, post)
    assert seen and not any(seen), "an integer tensor (a task index) reached the encoder, RSSM or decoder"
    (l0, p0), (l1, p1) = results[0], results[1]
    assert torch.equal(p0.deter, p1.deter) and torch.equal(p0.stoch, p1.stoch)
    for key in ("rec/vector", "dyn", "rep"):
        assert torch.equal(l0[key], l1[key]), key
    assert not torch.equal(l0["rew"], l1["rew"]) and not torch.equal(l0["con"], l1["con"])


def test_imagination_carries_each_starts_task_to_every_head_and_step():
    """Each task's reward head predicts its own constant: the imagined rewards of every start, at every step,
    are those of the start's task; actor, critic and continue head get the start's task at every step."""
    H = 4
    module = make_module(num_tasks=3, mode="heads", horizon=H)
    wm, ac = module.world_model, module.actor_critic
    with torch.no_grad():  # task k's reward head puts all mass on bin 100 + 20 k
        wm.reward_head.out.weight.zero_()
        wm.reward_head.out.bias.fill_(-1e4)
        for k in range(3):
            wm.reward_head.out.bias[k, 100 + 20 * k] = 1e4
    per_task = [float(wm.reward(torch.zeros(1, wm.rssm.feat_dim), torch.tensor([k])).mean()) for k in range(3)]
    assert len(set(per_task)) == 3
    calls = {"actor": [], "cont": []}
    for name, head in (("actor", ac.actor.net), ("cont", wm.cont_head)):
        head.register_forward_pre_hook(lambda m, args, name=name: calls[name].append(args[1].clone()))
    seen = {}
    ac.behavior_losses = lambda feat, actions, params, reward, cont, task=None: seen.update(reward=reward, task=task)
    start_task = torch.tensor([2, 0, 1, 1, 0, 2])
    N = len(start_task)
    start = module.world_model.rssm.initial(N, torch.device("cpu"))
    ac.imagine_loss(wm, start, torch.ones(N), start_task)
    expected = torch.tensor(per_task)[start_task]
    torch.testing.assert_close(seen["reward"][1:], expected[None].expand(H, N))
    assert torch.equal(seen["task"], start_task[None].expand(H + 1, N))
    # The rollout's policy acts per step (H calls of (N,)), then once over the H states with gradient.
    assert all(torch.equal(t, start_task) for t in calls["actor"][:H])
    assert torch.equal(calls["actor"][H], start_task[None].expand(H, N))
    assert torch.equal(calls["cont"][0], start_task[None].expand(H, N))


def test_acting_needs_each_envs_task_and_uses_it():
    module = make_module(num_tasks=2, mode="heads")
    perturb_output_layers(module)
    obs = {"vector": torch.randn(2, 5)}
    first = torch.ones(2, dtype=torch.bool)
    with pytest.raises(ValueError, match="pass the task of each env"):
        module.act(obs, first, module.initial_carry(2))
    same = {"vector": obs["vector"][:1].expand(2, 5)}
    action, _, _ = module.act(same, first, module.initial_carry(2), mode="mode", task=torch.tensor([0, 1]))
    assert not torch.equal(action[0], action[1])  # one observation, two tasks, two policies


# --------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("override, message", [
    (["multitask.conditioning=film"], "multitask.conditioning must be one of embedding, heads"),
    (["multitask.embed_dim=0"], "multitask.embed_dim must be positive"),
    (["init.ckpt=x", "init.parts=world_model,policy"], "init.parts='world_model,policy'"),
    (["init.freeze=true"], "init.ckpt is not set"),
    (["init.ckpt=x", "init.freeze=true", "init.parts=actor"], "add world_model to init.parts"),
])
def test_bad_multitask_and_init_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(["debug"], override)


# --------------------------------------------------------------------------------------------------
# End to end: two tasks through the CLI, then adaptation to a fifth from its checkpoint


@pytest.fixture(scope="module", params=MODES)
def two_task_run(request, tmp_path_factory):
    """A tiny two-task fit through the CLI with one conditioning mode (about 10 s at one thread)."""
    mode, tmp = request.param, tmp_path_factory.mktemp(f"two-{request.param}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lit_dreamer", "fit", "-c", "debug",
                           f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]", f"multitask.conditioning={mode}",
                           "run.steps=160", "run.prefill=80", "run.eval_every=100000", "run.eval_episodes=1",
                           f"run.dir={tmp}/run", f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return mode, tmp


def test_two_task_fit_logs_per_task_eval_and_its_checkpoint_rebuilds_the_conditioning(two_task_run):
    mode, tmp = two_task_run
    client = mlflow.MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("lit_dreamer").experiment_id])
    for k in (0, 1):
        assert f"eval/{task_metric_name(POINT.format(k))}/return" in run.data.metrics
        assert f"ac/{task_metric_name(POINT.format(k))}/return_scale" in run.data.metrics
    assert run.data.params["multitask.conditioning"] == mode
    path = f"{tmp}/run/checkpoints/last/model.ckpt"
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["hyper_parameters"]["num_tasks"] == 2
    assert ckpt["hyper_parameters"]["config"]["multitask"]["conditioning"] == mode
    module, _, _ = load_checkpoint(path)  # rebuilt from the hyperparameters alone, then loaded strictly
    assert module.cond == Conditioning(2, mode, 16)
    for name, value in module.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]), name
    rows = [name for name in ckpt["state_dict"] if task_indexed(name, module.cond)]
    assert rows and all(ckpt["state_dict"][name].shape[0] == 2 for name in rows)


def test_adapting_to_a_new_task_with_a_frozen_world_model(two_task_run, tmp_path, monkeypatch):
    """init.ckpt onto PointGoal-4 with init.freeze: a new MLflow run tagged with its source, the shared world
    model loaded and bit-identical after training, the reward and continue heads trained."""
    mode, tmp = two_task_run
    source = torch.load(f"{tmp}/run/checkpoints/last/model.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    built = []
    original_build = train_module.build
    monkeypatch.setattr(train_module, "build", lambda cfg: built.append(original_build(cfg)) or built[-1])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(["debug"], [f"env.tasks=[{POINT.format(4)},{POINT.format(1)}]", f"multitask.conditioning={mode}",
                                  f"init.ckpt={tmp}/run", "init.freeze=true", "run.steps=120", "run.prefill=80",
                                  f"run.dir={tmp_path}/adapted", f"logger.tracking_uri={uri}"])
    summary = fit(cfg)
    module = built[0][0]
    assert summary["train_steps"] > 0
    frozen = [name for name, p in module.world_model.named_parameters() if not p.requires_grad]
    assert frozen and all(not n.startswith(("reward_head", "cont_head")) for n in frozen)
    assert any(n.startswith("rssm.") for n in frozen) and any(n.startswith("vector_encoder.") for n in frozen)
    stepped = {id(p) for opt in module.trainer.optimizers for group in opt.param_groups for p in group["params"]}
    assert not any(id(module.world_model.get_parameter(name)) in stepped for name in frozen)
    assert id(module.world_model.reward_head.out.weight) in stepped
    for name in frozen:  # loaded from the checkpoint, and not moved by training
        assert torch.equal(module.world_model.get_parameter(name), source[f"world_model.{name}"]), name
    for head in ("reward_head", "cont_head"):
        trained = [(n, p) for n, p in module.world_model.named_parameters() if n.startswith(head)]
        assert all(p.requires_grad for _, p in trained)
        assert any(not torch.equal(p, source[f"world_model.{n}"]) for n, p in trained
                   if source[f"world_model.{n}"].shape == p.shape), head
    client = mlflow.MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    tag = run.data.tags["init_ckpt"]
    assert tag.startswith(os.path.abspath(f"{tmp}/run/checkpoints/")) and tag.endswith("model.ckpt")
    assert "resumed_from" not in run.data.tags and summary["env_steps"] == 120


def test_init_rows_are_mapped_by_task_name(two_task_run):
    """A new table [PointGoal-4, PointGoal-1]: PointGoal-1's rows come from the checkpoint's task 1, PointGoal-4's
    are fresh; the shared trunks load as they are."""
    mode, tmp = two_task_run
    from lit_dreamer.adapt import initialize
    path = f"{tmp}/run/checkpoints/last/model.ckpt"
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    source, hp = ckpt["state_dict"], ckpt["hyper_parameters"]
    cfg = replace(load_config(["debug"]).agent(), multitask=MultitaskConfig(conditioning=mode))
    torch.manual_seed(11)
    module = DreamerModule({k: tuple(v) for k, v in hp["obs_spec"].items()}, hp["action_dim"], hp["discrete"], cfg,
                           num_tasks=2)
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    report = initialize(module, path, ["world_model", "actor", "critic"], [POINT.format(4), POINT.format(1)])
    state = module.state_dict()
    rows = [name for name in state if task_indexed(name, module.cond)]
    assert rows and set(report.rows) == set(rows) and not report.fresh
    for name in rows:
        assert torch.equal(state[name][1], source[name][1]) and torch.equal(state[name][0], fresh[name][0]), name
    assert torch.equal(state["world_model.rssm.gru.gates.weight"], source["world_model.rssm.gru.gates.weight"])


def test_init_from_a_checkpoint_of_another_model_size_names_the_difference(two_task_run, tmp_path):
    _, tmp = two_task_run
    cfg = load_config(["debug"], [f"env.id={POINT.format(4)}", f"init.ckpt={tmp}/run", "model.units=32",
                                  "logger.backend=none", f"run.dir={tmp_path}/other"])
    with pytest.raises(ConfigError, match=r"init\.ckpt: checkpoint .* has another model config .*model\.units: "
                                          r"checkpoint 16 vs requested 32.*set model\.units=16"):
        fit(cfg)
    assert not os.path.exists(f"{tmp_path}/other/checkpoints")


def test_init_ckpt_and_ckpt_path_together_are_refused(two_task_run, tmp_path):
    _, tmp = two_task_run
    cfg = load_config(["debug"], [f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]", f"init.ckpt={tmp}/run",
                                  f"ckpt_path={tmp}/run", "run.steps=400", "logger.backend=none",
                                  f"run.dir={tmp_path}/both"])
    with pytest.raises(ConfigError, match="init.ckpt=.* and ckpt_path=.* are both set"):
        fit(cfg)


def test_continuing_with_the_other_conditioning_is_refused_naming_the_fix(two_task_run):
    mode, tmp = two_task_run
    other = "heads" if mode == "embedding" else "embedding"
    cfg = load_config(["debug"], [f"env.tasks=[{POINT.format(0)},{POINT.format(1)}]", f"multitask.conditioning={other}",
                                  "ckpt_path=last", f"run.dir={tmp}/run", "run.steps=400", "logger.backend=none"])
    with pytest.raises(ConfigError, match=f"multitask.conditioning={mode} .*but this run asks for {other}.*"
                                          f"set multitask.conditioning={mode} multitask.embed_dim=16"):
        fit(cfg)


@pytest.mark.parametrize("mode", MODES)
def test_init_from_a_one_task_model_gives_its_head_to_its_task_and_keeps_the_trunks(mode):
    from lit_dreamer.adapt import InitReport, TaskedState, load_parts
    one = make_module(num_tasks=1, seed=1)
    perturb_output_layers(one)
    source = TaskedState(one.state_dict(), one.cond, ["B"])
    module = make_module(num_tasks=2, mode=mode, seed=2)
    fresh = {k: v.clone() for k, v in module.state_dict().items()}
    report = load_parts(module, source, ["world_model", "actor", "critic"], ["A", "B"], InitReport("x"))
    state, old = module.state_dict(), one.state_dict()
    head = "world_model.reward_head"
    if mode == "heads":  # task B's output layer is the one-task head's; task A's is fresh
        assert torch.equal(state[f"{head}.out.weight"][1], old[f"{head}.out.weight"])
        assert torch.equal(state[f"{head}.out.weight"][0], fresh[f"{head}.out.weight"][0])
        assert torch.equal(state[f"{head}.trunk.0.0.weight"], old[f"{head}.trunk.0.0.weight"])
    else:  # the output layer is shared; the first layer's feature columns load, its task columns stay fresh
        features = old[f"{head}.trunk.0.0.weight"].shape[1]
        assert torch.equal(state[f"{head}.out.weight"], old[f"{head}.out.weight"])
        assert torch.equal(state[f"{head}.trunk.0.0.weight"][:, :features], old[f"{head}.trunk.0.0.weight"])
        assert torch.equal(state[f"{head}.trunk.0.0.weight"][:, features:], fresh[f"{head}.trunk.0.0.weight"][:, features:])
        assert f"{head}.embedding.rows" in report.fresh
    assert torch.equal(state["world_model.rssm.gru.gates.weight"], old["world_model.rssm.gru.gates.weight"])


@pytest.mark.parametrize("layers", [2, 0])
def test_an_embedded_head_is_its_trunk_on_the_features_and_task_vector_side_by_side(layers):
    """The split first layer (W_x x + W_e e, no concatenation) is the same function with the same gradients
    for every parameter as the trunk on torch.cat([x, e]); and it needs no gradient for the (detached) x."""
    torch.manual_seed(3)
    head = ConditionedHead(12, 5, units=16, layers=layers, bias=True, cond=Conditioning(3, "embedding", 4))
    with torch.no_grad():
        head.trunk[0][0].bias.normal_() if layers else None
    x, task = torch.randn(7, 6, 12), torch.randint(0, 3, (7, 6))
    split = head(x, task)
    grads = torch.autograd.grad(split.square().sum(), list(head.parameters()))
    reference = head.out(head.trunk(torch.cat([x, head.embedding(task)], -1)))
    expected = torch.autograd.grad(reference.square().sum(), list(head.parameters()))
    torch.testing.assert_close(split, reference)
    for (name, _), got, want in zip(head.named_parameters(), grads, expected):
        torch.testing.assert_close(got, want, msg=name)
    assert any(g.abs().sum() > 0 for g in grads[:1])  # the task rows get gradient


def test_an_embedded_head_skips_the_feature_gradient_the_concatenation_cost():
    """FLOPs (a count, not a timing): the concatenated input made autograd compute the first layer's input
    gradient in full, a (N, units) x (units, in + D) product, for the task columns alone."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    head = ConditionedHead(64, 5, units=32, layers=2, cond=Conditioning(4, "embedding", 16))
    x, task = torch.randn(100, 64), torch.randint(0, 4, (100,))

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn().square().sum().backward()
        return counter.get_total_flops()

    split = flops(lambda: head(x, task))
    concatenated = flops(lambda: head.out(head.trunk(torch.cat([x, head.embedding(task)], -1))))
    input_gradient = 2 * 100 * 32 * (64 + 16)
    assert concatenated - split >= input_gradient

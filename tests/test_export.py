"""Policy export (lit_dreamer.export): noise-driven sampling, the exported graphs' parity with the eager policy
over 1,000 env steps, running them without Lightning, the CLI, and the numpy-only ONNX example.

One tiny trained debug agent per kind (discrete vector, continuous vector, discrete image), trained and
exported once per module through `python -m lit_dreamer export` (in process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_dreamer.distributions import BoundedNormal, Categorical, gumbel_noise
from lit_dreamer.envs import env_action, make_env
from lit_dreamer.export import FORMATS, ActingPolicy, acting_policy, description_path

REPO = Path(__file__).resolve().parent.parent
PARITY_STEPS = 1000
TOLERANCE = 1e-5


# --------------------------------------------------------------------------------------------------
# Noise-driven sampling against the training samplers


def frequency_bound(p: np.ndarray, n: int) -> np.ndarray:
    """Five standard deviations of the difference of two independent class frequencies over n draws each."""
    return 5.0 * np.sqrt(2.0 * p * (1.0 - p) / n)


def test_gumbel_sampling_draws_the_training_samplers_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, -4.0]])
    n = 200_000
    dist = Categorical(logits.expand(n, 5), unimix=0.01)
    trained = dist.sample().sum(0).numpy() / n  # the inverse-CDF sampler training uses
    noisy = dist.sample_from(gumbel_noise((n, 5), torch.Generator().manual_seed(1))).sum(0).numpy() / n
    p = dist.probs[0].numpy()
    assert np.all(np.abs(noisy - trained) <= frequency_bound(p, n)), (noisy, trained, p)
    # Both unbiased: each within its own bound of the probabilities (unimix keeps the rare class at >= 0.2%).
    assert np.all(np.abs(noisy - p) <= frequency_bound(p, n) / np.sqrt(2)), (noisy, p)


def test_normal_sampling_draws_the_training_samplers_distribution():
    torch.manual_seed(0)
    n = 200_000
    dist = BoundedNormal(torch.full((n, 2), 0.3), torch.tensor([-1.0, 1.0]).expand(n, 2))
    trained, noisy = dist.sample(), dist.sample_from(torch.randn(n, 2, generator=torch.Generator().manual_seed(1)))
    std = dist.std[0]
    # Means within 5 standard errors of each other, standard deviations within 5 of theirs (sd/sqrt(2n) each).
    assert torch.all((noisy.mean(0) - trained.mean(0)).abs() <= 5 * std * (2 / n) ** 0.5)
    assert torch.all((noisy.std(0) - trained.std(0)).abs() <= 5 * std / n ** 0.5)


def test_zero_noise_gives_the_mode():
    logits = torch.randn(64, 4, 6, generator=torch.Generator().manual_seed(0))
    latent = Categorical(logits, unimix=0.01, event_dims=1)
    assert torch.equal(latent.sample_from(torch.zeros_like(logits)), latent.mode())
    actions = BoundedNormal(logits[..., :3], logits[..., 3:])
    assert torch.equal(actions.sample_from(torch.zeros(64, 4, 3)), actions.mode())


# --------------------------------------------------------------------------------------------------
# Trained agents, exported through the CLI


@dataclass
class Exported:
    folder: Path
    module: torch.nn.Module
    policy: ActingPolicy
    env_id: str
    env_kwargs: dict

    def graph(self, format: str) -> Path:
        return self.folder / f"policy{FORMATS[format]}"

    def meta(self, format: str) -> dict:
        return json.loads(Path(description_path(str(self.graph(format)))).read_text())


def train_and_export(root: Path, *overrides: str) -> Exported:
    """A debug run (no logger) in root/run, exported to root/policy.onnx and root/policy.pt2 by the CLI."""
    from lit_dreamer.__main__ import main
    from lit_dreamer.config import load_config
    from lit_dreamer.evaluation import load_checkpoint
    from lit_dreamer.resume import find_checkpoint
    from lit_dreamer.train import fit
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        cfg = load_config(["debug"], [f"run.dir={root / 'run'}", "logger.backend=none", *overrides])
        fit(cfg)
        for format, extension in FORMATS.items():
            assert main(["export", "--ckpt", str(root / "run"), f"format={format}",
                         f"out={root / ('policy' + extension)}"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    module, cfg, _ = load_checkpoint(find_checkpoint(str(root / "run")))
    return Exported(root, module, acting_policy(module), cfg.env.id, cfg.env.make_kwargs())


# 40 gradient steps each: enough to move the weights away from their initialization, which is all parity needs.
SHORT = ("run.steps=80", "run.prefill=40")


@pytest.fixture(scope="module")
def cartpole(tmp_path_factory) -> Exported:
    return train_and_export(tmp_path_factory.mktemp("cartpole"), *SHORT)


@pytest.fixture(scope="module")
def pendulum(tmp_path_factory) -> Exported:
    return train_and_export(tmp_path_factory.mktemp("pendulum"), "env.id=Pendulum-v1", *SHORT)


@pytest.fixture(scope="module")
def cartpole_pixels(tmp_path_factory) -> Exported:
    return train_and_export(tmp_path_factory.mktemp("pixels"), "env.obs=pixels", "env.image_size=32", *SHORT)


KINDS = ["cartpole", "pendulum", "cartpole_pixels"]


# --------------------------------------------------------------------------------------------------
# Parity: eager policy, onnxruntime and the torch.export program, step by step on identical inputs


def noise_inputs(policy: ActingPolicy, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One step's noise for one env: Gumbel for the latent (and a discrete action), normal for a box action."""
    latent, action = (s for s in policy.input_specs if s.role == "noise")
    draw = rng.gumbel if policy.discrete else rng.standard_normal
    return {latent.name: rng.gumbel(size=(1, *latent.shape)).astype(np.float32),
            action.name: draw(size=(1, *action.shape)).astype(np.float32)}


def zero_state(policy: ActingPolicy) -> list[np.ndarray]:
    return [np.zeros((1, *s.shape), np.float32) for s in policy.input_specs if s.role == "state"]


def step_inputs(policy: ActingPolicy, obs: dict, is_first: bool, state: list[np.ndarray], noise: dict
                ) -> list[np.ndarray]:
    """The graph's inputs in order, as numpy arrays with a batch of one."""
    state_values = iter(state)
    values = []
    for spec in policy.input_specs:
        if spec.role == "observation":
            values.append(np.asarray(obs[spec.name.removeprefix("obs/")], spec.dtype)[None])
        elif spec.role == "is_first":
            values.append(np.array([is_first]))
        elif spec.role == "state":
            values.append(next(state_values))
        else:
            values.append(noise[spec.name])
    return values


def run_parity(agent: Exported, steps: int) -> dict[str, dict[str, float]]:
    """Drive a real env with the eager policy's actions for `steps` steps; every step, feed the same observation
    and noise to the eager policy, onnxruntime and the torch.export program, each with its own state fed back.
    Returns the max abs difference of each output against the eager policy's, per backend."""
    import onnxruntime as ort
    policy = agent.policy
    session = ort.InferenceSession(str(agent.graph("onnx")), providers=["CPUExecutionProvider"])
    program = torch.export.load(str(agent.graph("torch"))).module()
    backends = {"eager": lambda xs: [o.numpy() for o in policy(*map(torch.from_numpy, xs))],
                "onnx": lambda xs: session.run(policy.output_names, dict(zip(policy.input_names, xs))),
                "torch": lambda xs: [o.numpy() for o in program(*map(torch.from_numpy, xs))]}
    states = {name: zero_state(policy) for name in backends}
    diffs = {name: dict.fromkeys(policy.output_names, 0.0) for name in ("onnx", "torch")}
    rng = np.random.default_rng(0)
    env = make_env(agent.env_id, seed=0, **agent.env_kwargs)
    obs, _ = env.reset(seed=0)
    is_first = True
    with torch.no_grad():
        for _ in range(steps):
            noise = noise_inputs(policy, rng)
            outputs = {name: run(step_inputs(policy, obs, is_first, states[name], noise))
                       for name, run in backends.items()}
            for name in diffs:
                for key, mine, eager in zip(policy.output_names, outputs[name], outputs["eager"]):
                    assert mine.shape == eager.shape and mine.dtype == eager.dtype, (name, key)
                    if key == "action" and policy.discrete:
                        assert np.array_equal(mine, eager), f"{name}: action {mine} != {eager}"
                    diffs[name][key] = max(diffs[name][key], float(np.abs(mine - eager).max()))
            states = {name: list(out[1:]) for name, out in outputs.items()}
            action = outputs["eager"][0][0]
            env_input = int(action) if policy.discrete else env_action(action, False)
            obs, _, terminated, truncated, _ = env.step(env_input)
            is_first = terminated or truncated
            if is_first:
                obs, _ = env.reset()
    env.close()
    return diffs


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", KINDS)
def test_exported_policies_match_the_eager_policy_over_1000_env_steps(kind, request):
    agent = request.getfixturevalue(kind)
    diffs = run_parity(agent, PARITY_STEPS)
    print(f"\nparity {kind} over {PARITY_STEPS} steps, max abs diff: {json.dumps(diffs)}")
    for backend, per_output in diffs.items():
        assert all(d <= TOLERANCE for d in per_output.values()), (backend, per_output)


def test_eager_policy_with_zero_noise_acts_as_the_module_with_mode_latents(cartpole, pendulum, monkeypatch):
    """The exported step is the agent's own act: with the latent's mode drawn in both, actions and states agree."""
    monkeypatch.setattr(Categorical, "sample", Categorical.mode)
    for agent in (cartpole, pendulum):
        policy, module = agent.policy, agent.module
        env = make_env(agent.env_id, seed=1, **agent.env_kwargs)
        obs, _ = env.reset(seed=1)
        carry = module.initial_carry(1)
        state = [torch.from_numpy(s) for s in zero_state(policy)]
        for t in range(30):
            tensors = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
            action, carry, post = module.act(tensors, torch.tensor([t == 0]), carry, mode="mode")
            noise = {s.name: torch.zeros(1, *s.shape) for s in policy.input_specs if s.role == "noise"}
            inputs = step_inputs(policy, obs, t == 0, state, noise)
            with torch.no_grad():
                out = policy(*(torch.as_tensor(x) for x in inputs))
            assert torch.equal(out[1], post.deter) and torch.equal(out[2], post.stoch)
            assert torch.equal(out[3], action)
            state = list(out[1:])
            obs, _, terminated, truncated, _ = env.step(env_action(action.numpy(), policy.discrete)[0])
            if terminated or truncated:
                break
        env.close()


# --------------------------------------------------------------------------------------------------
# The files alone: no Lightning, dynamic batch, the JSON


ONNX_RUNNER = """
import json, sys
import numpy as np
import onnxruntime as ort
graph = sys.argv[1]
meta = json.load(open(graph + ".json"))
session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
for batch in (1, 3):
    feed = {s["name"]: np.zeros([batch, *s["shape"][1:]], s["dtype"]) for s in meta["inputs"]}
    feed["is_first"][:] = True
    outputs = session.run(None, feed)
    assert [list(o.shape) for o in outputs] == [[batch, *s["shape"][1:]] for s in meta["outputs"]]
assert "lightning" not in sys.modules and "torch" not in sys.modules and "lit_dreamer" not in sys.modules
print("ok")
"""

TORCH_RUNNER = """
import json, sys
import torch
graph = sys.argv[1]
meta = json.load(open(graph + ".json"))
policy = torch.export.load(graph).module()
for batch in (1, 3):
    inputs = [torch.zeros([batch, *s["shape"][1:]], dtype=getattr(torch, s["dtype"])) for s in meta["inputs"]]
    inputs[[s["name"] for s in meta["inputs"]].index("is_first")][:] = True
    outputs = policy(*inputs)
    assert [list(o.shape) for o in outputs] == [[batch, *s["shape"][1:]] for s in meta["outputs"]]
assert "lightning" not in sys.modules and "lit_dreamer" not in sys.modules, sorted(sys.modules)
print("ok")
"""


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")  # nothing of the checkout on the path
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("format", list(FORMATS))
def test_exported_files_run_alone_without_lightning_at_any_batch(cartpole_pixels, format):
    runner = ONNX_RUNNER if format == "onnx" else TORCH_RUNNER
    proc = run_python(runner, str(cartpole_pixels.graph(format)), cwd=cartpole_pixels.folder)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_description_names_inputs_outputs_state_noise_and_action_space(cartpole, pendulum, cartpole_pixels):
    meta = cartpole.meta("onnx")
    assert [s["name"] for s in meta["inputs"]] == ["obs/vector", "is_first", "state/deter", "state/stoch",
                                                   "state/action", "noise/latent", "noise/action"]
    assert meta["inputs"][0] == {"name": "obs/vector", "shape": ["batch", 4], "dtype": "float32",
                                 "role": "observation"}
    assert [s["name"] for s in meta["outputs"]] == ["action", "next_state/deter", "next_state/stoch",
                                                    "next_state/action"]
    assert meta["outputs"][0]["dtype"] == "int64" and meta["outputs"][0]["shape"] == ["batch"]
    assert meta["action_space"] == {"type": "discrete", "n": 2, "env_start": 0}
    assert [n["deterministic"] for n in meta["noise"]] == [0.0, 0.0] and meta["format"] == "onnx"
    space = pendulum.meta("torch")["action_space"]
    # Pendulum's own torque bounds, which lit_dreamer rescales [-1, 1] to.
    assert space["dim"] == 1 and space["env_low"] == [-2.0] and space["env_high"] == [2.0]
    assert pendulum.meta("torch")["noise"][1]["distribution"] == "normal"
    image = cartpole_pixels.meta("onnx")["inputs"][0]
    assert image == {"name": "obs/image", "shape": ["batch", 32, 32, 3], "dtype": "uint8", "role": "observation"}


def test_the_env_bounds_come_from_the_checkpoint_where_the_env_cannot_be_made(pendulum, tmp_path, monkeypatch):
    import gymnasium

    from lit_dreamer.__main__ import main

    def refuse(*args, **kwargs):
        raise gymnasium.error.Error("not installed here")

    monkeypatch.setattr(gymnasium, "make", refuse)
    out = tmp_path / "policy.pt2"
    assert main(["export", "--ckpt", str(pendulum.folder / "run"), "format=torch", f"out={out}"]) == 0
    space = json.loads(Path(description_path(str(out))).read_text())["action_space"]
    assert space["env_low"] == [-2.0] and space["env_high"] == [2.0]


def test_export_refuses_an_unknown_format(cartpole, capsys):
    from lit_dreamer.__main__ import main
    assert main(["export", "--ckpt", str(cartpole.folder / "run"), "format=tflite"]) == 2
    assert "format must be one of onnx, torch" in capsys.readouterr().err


def test_onnx_export_without_its_exporter_packages_says_what_to_install(cartpole, capsys, monkeypatch):
    import importlib.util

    from lit_dreamer.__main__ import main
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "onnxscript" else find_spec(name, *args))
    assert main(["export", "--ckpt", str(cartpole.folder / "run"), f"out={cartpole.folder / 'x.onnx'}"]) == 2
    assert "format=onnx needs onnxscript" in capsys.readouterr().err and not (cartpole.folder / "x.onnx").exists()


def run_example(agent: Exported, *args: str) -> list[tuple[float, int]]:
    """examples/onnx_policy.py on the agent's ONNX file, as a script in a process that never imports torch or
    Lightning; the (return, steps) of each episode it prints."""
    code = ("import runpy, sys; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__'); "
            "assert not {'torch', 'lightning', 'lit_dreamer'} & set(sys.modules), 'imported the training stack'")
    proc = run_python(code, str(REPO / "examples" / "onnx_policy.py"), str(agent.graph("onnx")), *args,
                      cwd=agent.folder)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [f"episode {k + 1}" for k in range(len(lines))], proc.stdout
    return [(float(line.split("return ")[1].split()[0]), int(line.split(" in ")[1].split()[0])) for line in lines]


def test_onnx_example_runs_the_policy_in_its_env_with_numpy_only(cartpole, pendulum):
    for extra in ([], ["--sample"]):
        episodes = run_example(cartpole, "--episodes", "2", "--max-steps", "50", *extra)
        # CartPole pays 1 per step: each episode's return is its length.
        assert len(episodes) == 2 and all(ret == steps and 1 <= steps <= 50 for ret, steps in episodes)
    # A box action in [-1, 1] rescaled to Pendulum's torque bounds; its episodes end by the time limit only.
    [(ret, steps)] = run_example(pendulum, "--max-steps", "20", "--sample")
    assert steps == 20 and -20 * 16.3 <= ret <= 0  # Pendulum's reward per step is in [-16.27, 0]


def untrained(kind: str):
    """An untrained agent of a kind the trained fixtures do not cover: several tasks, or a text-conditioned one."""
    from lit_dreamer.agent_config import AgentConfig, ModelConfig
    from lit_dreamer.module import DreamerModule
    from tests.test_text import SPEC, TINY
    torch.manual_seed(0)
    if kind == "several_tasks":
        return DreamerModule({"vector": ((3,), "float32")}, 2, True, AgentConfig(model=TINY), num_tasks=2)
    return DreamerModule(SPEC, 2, True, AgentConfig(model=ModelConfig(**{**TINY.__dict__, "text_condition": True})))


def random_obs(module, n: int) -> dict[str, torch.Tensor]:
    return {key: torch.randint(0, 5, (n, *shape)) if np.dtype(dtype) == np.int64 else torch.randn(n, *shape)
            for key, (shape, dtype) in module.obs_spec.items()}


@pytest.mark.parametrize("kind", ["several_tasks", "text_condition"])
def test_policies_with_a_task_or_a_text_condition_export_and_act_as_the_module(kind, tmp_path, monkeypatch):
    from lit_dreamer.export import export_torch
    module = untrained(kind).eval()
    policy = acting_policy(module)
    names = [s.name for s in policy.input_specs]
    assert ("task" in names) == (kind == "several_tasks")
    export_torch(policy, str(tmp_path / "policy.pt2"))
    program = torch.export.load(str(tmp_path / "policy.pt2")).module()
    monkeypatch.setattr(Categorical, "sample", Categorical.mode)  # act's latent draw: its mode, as zero noise
    obs, task = random_obs(module, 2), torch.tensor([1, 0])
    inputs = list(policy.initial_inputs(2, obs))
    if "task" in names:
        inputs[names.index("task")] = task
    with torch.no_grad():
        eager, exported = policy(*inputs), program(*inputs)
        action, _, post = module.act(obs, torch.ones(2, dtype=torch.bool), module.initial_carry(2), mode="mode",
                                     task=task)
    assert torch.equal(eager[1], post.deter) and torch.equal(eager[2], post.stoch) and torch.equal(eager[3], action)
    for mine, reference in zip(exported, eager):
        assert torch.allclose(mine, reference, atol=TOLERANCE, rtol=0)


def test_onnx_example_maps_actions_to_the_envs_own_units():
    import importlib.util
    spec = importlib.util.spec_from_file_location("onnx_policy", REPO / "examples" / "onnx_policy.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    box = {"type": "continuous", "dim": 2, "low": -1.0, "high": 1.0, "env_low": [-2.0, 0.0], "env_high": [2.0, 10.0]}
    assert example.env_action(np.array([1.0, -1.0], np.float32), box).tolist() == [2.0, 0.0]
    assert example.env_action(np.array([0.0, 0.5], np.float32), box).tolist() == [0.0, 7.5]
    assert example.env_action(np.int64(2), {"type": "discrete", "n": 3, "env_start": -1}) == 1

"""Run a lit_dreamer policy exported to ONNX in a gymnasium env, with numpy and onnxruntime only.

    python -m lit_dreamer export --ckpt runs/cartpole format=onnx out=policy.onnx
    python examples/onnx_policy.py policy.onnx --episodes 3            # most likely actions
    python examples/onnx_policy.py policy.onnx --episodes 3 --sample   # sampled, as in training

No torch and no lit_dreamer are imported. policy.onnx.json, written beside the graph, names its inputs and
outputs: each step feeds the observation, is_first, the recurrent state (zeros at an episode's start, then
the state the previous step returned) and the noise (zeros for the deterministic policy).
The env's own observation is fed as it comes: a single Box is the graph's one observation input, a Dict
feeds each key. A policy trained from rendered frames (env.obs=pixels) needs the frames resized to the
trained image size instead; lit_dreamer's make_env does that.
"""

from __future__ import annotations

import argparse
import json

import gymnasium as gym
import numpy as np
import onnxruntime as ort


class OnnxPolicy:
    """The exported graph and its description: `act(obs, is_first, state) -> (action, state)` for one env."""

    def __init__(self, path: str, sample: bool = False, seed: int = 0):
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        with open(path + ".json") as f:
            self.meta = json.load(f)
        self.specs = {spec["name"]: spec for spec in self.meta["inputs"]}
        self.output_names = [spec["name"] for spec in self.meta["outputs"]]
        self.sample, self.rng = sample, np.random.default_rng(seed)

    def initial_state(self) -> dict[str, np.ndarray]:
        """The recurrent state at an episode's start: zeros."""
        return {s["input"]: self.zeros(s["input"]) for s in self.meta["state"]}

    def zeros(self, name: str) -> np.ndarray:
        spec = self.specs[name]
        return np.zeros([1, *spec["shape"][1:]], spec["dtype"])

    def noise(self, noise: dict) -> np.ndarray:
        """Zeros for the deterministic policy; else a draw of the noise's distribution (Gumbel or normal)."""
        if not self.sample:
            return self.zeros(noise["name"])
        shape = [1, *self.specs[noise["name"]]["shape"][1:]]
        draw = self.rng.gumbel(size=shape) if noise["distribution"] == "gumbel" else self.rng.standard_normal(shape)
        return draw.astype(np.float32)

    def observation_inputs(self, obs) -> dict[str, np.ndarray]:
        """The env's observation as the graph's observation inputs (obs/<key>), each with a batch of one."""
        names = [name for name, spec in self.specs.items() if spec["role"] == "observation"]
        values = obs if isinstance(obs, dict) else {names[0].removeprefix("obs/"): obs}
        if not isinstance(obs, dict) and len(names) != 1:
            raise ValueError(f"the policy takes {len(names)} observations ({names}), the env gives one array")
        feed = {}
        for name in names:
            spec = self.specs[name]
            value = np.asarray(values[name.removeprefix("obs/")], dtype=spec["dtype"])
            if value.size != int(np.prod(spec["shape"][1:])):
                raise ValueError(f"{name}: the policy takes shape {spec['shape'][1:]}, the env gives {value.shape}")
            feed[name] = value.reshape(1, *spec["shape"][1:])
        return feed

    def act(self, obs, is_first: bool, state: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feed = {**self.observation_inputs(obs), "is_first": np.array([is_first]), **state}
        if "task" in self.specs:
            feed["task"] = np.zeros(1, np.int64)  # a policy of several tasks: act for its first task
        feed.update({noise["name"]: self.noise(noise) for noise in self.meta["noise"]})
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, feed)))
        return outputs["action"][0], {s["input"]: outputs[s["output"]] for s in self.meta["state"]}


def env_action(action: np.ndarray, space: dict):
    """The policy's action (an index, or a vector in [-1, 1]) in the env's own units."""
    if space["type"] == "discrete":
        return int(action) + space.get("env_start", 0)
    if "env_low" not in space:
        return action
    low, high = np.asarray(space["env_low"]), np.asarray(space["env_high"])
    return (low + (action + 1.0) / 2.0 * (high - low)).astype(np.float32)


def run_episode(env: gym.Env, policy: OnnxPolicy, seed: int, max_steps: int) -> tuple[float, int]:
    """One episode of at most max_steps policy steps; each action is repeated as in training (env.action_repeat)."""
    obs, _ = env.reset(seed=seed)
    state, is_first, total = policy.initial_state(), True, 0.0
    repeat = policy.meta["source"].get("action_repeat", 1)
    for step in range(1, max_steps + 1):
        action, state = policy.act(obs, is_first, state)
        for _ in range(repeat):
            obs, reward, terminated, truncated, _ = env.step(env_action(action, policy.meta["action_space"]))
            total, is_first = total + float(reward), False
            if terminated or truncated:
                return total, step
    return total, max_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy", help="the .onnx file written by `python -m lit_dreamer export`")
    parser.add_argument("--env", help="gymnasium env id (default: the one the policy was trained on)")
    parser.add_argument("--episodes", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=1000)
    parser.add_argument("--sample", action="store_true", help="sample latents and actions as in training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    policy = OnnxPolicy(args.policy, sample=args.sample, seed=args.seed)
    env = gym.make(args.env or policy.meta["source"]["env_id"])
    for episode in range(args.episodes):
        total, steps = run_episode(env, policy, args.seed + episode, args.max_steps)
        print(f"episode {episode + 1}: return {total:.1f} in {steps} steps")
    env.close()


if __name__ == "__main__":
    main()

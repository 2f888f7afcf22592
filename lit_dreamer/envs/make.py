"""``make_env``: one entry point from a clear id to an env in lit_dreamer's convention.

Ids come in four families:

- gymnasium ids such as ``CartPole-v1`` or ``Pendulum-v1`` (``module:Env-v0`` imports ``module`` first);
- ``dmc/<domain>-<task>`` (or the native ``dm_control/<domain>-<task>-v0``) through shimmy;
- ``atari/<game>`` (or the native ``ALE/<Game>-v5``) through ale-py, with the Atari-100k protocol;
- ``babyai/<Level>`` and ``minigrid/<Env>`` (or the native ``BabyAI-...-vN``, ``MiniGrid-...-vN``) through minigrid.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import re
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal

import gymnasium as gym
from gymnasium import spaces
from gymnasium.wrappers import AddRenderObservation, AtariPreprocessing, RepeatAction, ResizeObservation, TimeLimit

from lit_dreamer.envs.adapters import DictObservation, adapt_action_space
from lit_dreamer.envs.faults import CutNonFinite, RestartOnError
from lit_dreamer.envs.instructions import HeldOutInstructions
from lit_dreamer.envs.minigrid import is_minigrid_id, load_minigrid, make_minigrid, minigrid_gym_id, short_ids
from lit_dreamer.envs.spaces import FRAMES_PER_STEP_KEY
from lit_dreamer.envs.text import DEFAULT_TEXT_LENGTH, TextVocabularies, wrap_text
from lit_dreamer.rewards import RewardConfig, wrap_env, wrap_vector_env

OBS_MODES = ("proprio", "pixels")

# Atari-100k protocol (DreamerV3): no sticky actions, frame skip 4 with max-pooling over the last two
# frames, up to 30 no-ops at reset, episodes capped at 108,000 frames (27,000 agent steps).
ATARI_FRAME_SKIP = 4
ATARI_MAX_FRAMES = 108_000
ATARI_NOOP_MAX = 30


@dataclass(frozen=True)
class ResolvedEnvId:
    """Which adapter builds an env id, and the gymnasium registry id it builds."""

    family: Literal["gym", "dmc", "atari", "minigrid"]
    gym_id: str


def _load_dm_control() -> None:
    # MuJoCo picks its GL backend when first imported; EGL is the one that renders on headless CPUs.
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        import shimmy
    except ImportError as error:
        raise ImportError("dm_control envs need shimmy: pip install 'shimmy[dm-control]'") from error
    gym.register_envs(shimmy)


def _load_atari() -> None:
    try:
        import ale_py
    except ImportError as error:
        raise ImportError("Atari envs need ale-py: pip install ale-py") from error
    gym.register_envs(ale_py)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _atari_game_id(game: str) -> str:
    """``ms_pacman``, ``mspacman`` and ``MsPacman`` all name ``ALE/MsPacman-v5``."""
    wanted = game.replace("_", "").lower()
    for gym_id in gym.registry:
        match = re.fullmatch(r"ALE/(\w+)-v5", gym_id)
        if match and match.group(1).lower() == wanted:
            return gym_id
    return f"ALE/{game}-v5"


def _known_ids() -> list[str]:
    """Registry ids plus our short forms, for suggestions when an id is unknown."""
    for load in (_load_dm_control, _load_atari, load_minigrid):
        try:
            load()
        except ImportError:
            pass
    known = list(gym.registry)
    for gym_id in gym.registry:
        if match := re.fullmatch(r"dm_control/(.+)-v0", gym_id):
            known.append(f"dmc/{match.group(1)}")
        elif match := re.fullmatch(r"ALE/(\w+)-v5", gym_id):
            known.append(f"atari/{_snake_case(match.group(1))}")
    return known + short_ids(list(gym.registry))


def _unknown_id_error(env_id: str, gym_id: str) -> ValueError:
    looked_up = f" (looked up as {gym_id!r})" if gym_id != env_id else ""
    close = difflib.get_close_matches(env_id, _known_ids(), n=5, cutoff=0.6)
    hint = (
        f"closest registered ids: {', '.join(close)}"
        if close
        else "ids look like 'CartPole-v1', 'dmc/walker-walk', 'atari/pong' or 'babyai/GoToLocal'"
    )
    return ValueError(f"unknown environment id {env_id!r}{looked_up}; {hint}")


def _import_env_module(module: str, full_id: str) -> None:
    """Import the module named by a ``module:Env-v0`` id (importing it registers its envs), or raise a ValueError."""
    try:
        importlib.import_module(module)
    except ImportError as error:  # also a missing dependency of that module: the message names which
        raise ValueError(
            f"cannot import {module!r}, the module part of {full_id!r} ({error}); install the package that "
            f"provides it or add its folder to PYTHONPATH, or drop the '{module}:' prefix if the env is "
            "registered already"
        ) from None


def resolve_env_id(env_id: str) -> ResolvedEnvId:
    """Map a user-facing id to its family and registry id, or raise a ValueError with suggestions."""
    if env_id.startswith(("dmc/", "dm_control/")):
        _load_dm_control()
        name = env_id.split("/", 1)[1]
        resolved = ResolvedEnvId("dmc", env_id if env_id.startswith("dm_control/") else f"dm_control/{name}-v0")
    elif env_id.startswith(("atari/", "ALE/")):
        _load_atari()
        name = env_id.split("/", 1)[1]
        resolved = ResolvedEnvId("atari", env_id if env_id.startswith("ALE/") else _atari_game_id(name))
    elif is_minigrid_id(env_id):
        load_minigrid()
        resolved = ResolvedEnvId("minigrid", minigrid_gym_id(env_id))
    else:
        if ":" in env_id:
            module, env_id = env_id.split(":", 1)
            _import_env_module(module, f"{module}:{env_id}")
        resolved = ResolvedEnvId("minigrid" if is_minigrid_id(env_id) else "gym", env_id)
    if resolved.gym_id not in gym.registry:
        raise _unknown_id_error(env_id, resolved.gym_id)
    return resolved


def _require_rgb_render(env: gym.Env, env_id: str) -> None:
    if "rgb_array" not in env.metadata.get("render_modes", []):
        env.close()
        raise ValueError(
            f"obs='pixels' needs an env that renders rgb_array frames, and {env_id!r} supports only "
            f"{env.metadata.get('render_modes', [])}; use obs='proprio'"
        )


def _make_gym(gym_id: str, *, obs: str, image_size: int, render: bool) -> gym.Env:
    # Pass render_mode only when rendering: custom envs may not take the argument at all.
    env = gym.make(gym_id, **({"render_mode": "rgb_array"} if obs == "pixels" or render else {}))
    if obs == "pixels":
        _require_rgb_render(env, gym_id)
        env = AddRenderObservation(env, render_only=True)
    space = env.observation_space
    is_image = isinstance(space, spaces.Box) and len(space.shape) == 3 and space.shape[-1] in (1, 3)
    if is_image and space.shape[:2] != (image_size, image_size):
        env = ResizeObservation(env, (image_size, image_size))
    return env


def _make_dmc(gym_id: str, *, obs: str, image_size: int, render: bool) -> gym.Env:
    if obs == "pixels" or render:
        camera = {"width": image_size, "height": image_size, "camera_id": 0}
        env = gym.make(gym_id, render_mode="rgb_array", render_kwargs=camera)
    else:
        env = gym.make(gym_id)
    # The suite ends every episode by its time limit (1000 control steps): shimmy reports that
    # as truncation, so it arrives as is_last without is_terminal.
    return AddRenderObservation(env, render_only=True) if obs == "pixels" else env


def _make_atari(gym_id: str, *, obs: str, image_size: int, render: bool) -> gym.Env:
    del obs  # the screen is Atari's native observation: both modes give the image
    env = gym.make(
        gym_id,
        frameskip=1,
        repeat_action_probability=0.0,
        full_action_space=False,
        max_num_frames_per_episode=ATARI_MAX_FRAMES,
        render_mode="rgb_array" if render else None,
    )
    return AtariPreprocessing(
        env,
        noop_max=ATARI_NOOP_MAX,
        frame_skip=ATARI_FRAME_SKIP,
        screen_size=image_size,
        terminal_on_life_loss=False,
        grayscale_obs=False,
    )


_BUILDERS = {"gym": _make_gym, "dmc": _make_dmc, "atari": _make_atari, "minigrid": make_minigrid}


def _count_frames_per_step(env: gym.Env) -> int:
    """Product of every frame-repeating layer in the wrapper chain."""
    frames = 1
    while True:
        if isinstance(env, RepeatAction):
            frames *= env.num_repeats
        elif isinstance(env, AtariPreprocessing):
            frames *= env.frame_skip
        if not isinstance(env, gym.Wrapper):
            skip = getattr(env, "_frameskip", 1)
            return frames * (skip if isinstance(skip, int) else 1)
        env = env.env


def make_env(
    env_id: str,
    *,
    obs: str = "proprio",
    action_repeat: int = 1,
    image_size: int = 64,
    time_limit: int | None = None,
    seed: int | None = None,
    render: bool = False,
    text_length: int = DEFAULT_TEXT_LENGTH,
    vocabularies: TextVocabularies | None = None,
    reward: RewardConfig | None = None,
    held_out: Sequence[str] = (),
    held_out_only: bool = False,
) -> gym.Env:
    """Build an env whose observations are a flat ``spaces.Dict`` and whose actions are
    ``Discrete(n)`` or ``Box(-1, 1, (A,), float32)``.

    Args:
        env_id: a gymnasium id, ``dmc/<domain>-<task>``, ``atari/<game>``, ``babyai/<Level>``,
            ``minigrid/<Env>`` or the native ``dm_control/...-v0`` / ``ALE/...-v5`` / ``BabyAI-...-vN`` /
            ``MiniGrid-...-vN`` (native ids get the same adapters).
        obs: ``"proprio"`` for the env's own observation, ``"pixels"`` for ``{"image": uint8 SxSx3}``
            rendered from the env (dm_control camera 0). Atari always observes the screen. MiniGrid
            gives ``grid`` (its 7x7 symbolic view, one-hot cells) or, with pixels, ``image`` (the
            egocentric RGB view), each beside ``direction`` and ``mission``.
        action_repeat: repeat each action this many times, summing rewards and stopping at an episode
            end. Atari already repeats 4 frames (its protocol), so it takes only 1 or 4 here.
        image_size: side S of square images.
        time_limit: extra limit in agent steps; reaching it truncates (is_last, not is_terminal).
        seed: seeds the env and its action space with a first ``reset(seed=seed)``.
        render: also create the env with render_mode="rgb_array" so ``env.render()`` gives frames.
        text_length: tokens L kept of each text observation (``lit_dreamer.envs.text``).
        vocabularies: the run's text vocabularies, shared by all its envs (None: this env grows its own).
        reward: the ``reward`` config section: a function's or a language model's reward instead of (or added to)
            the env's (``lit_dreamer.rewards``; a language model answers only through ``make_vector_env``).
        held_out: instruction phrases whose episodes are redrawn at reset (``lit_dreamer.envs.instructions``);
            with ``held_out_only`` the other episodes are redrawn instead (evaluation on the held-out ones).

    ``frames_per_step(env)`` tells the frames one agent step spans (action repeat, or 4 on Atari).
    """
    if obs not in OBS_MODES:
        raise ValueError(f"unknown obs mode {obs!r}; choose one of {', '.join(OBS_MODES)}")
    if action_repeat < 1:
        raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
    resolved = resolve_env_id(env_id)
    if resolved.family == "atari" and action_repeat not in (1, ATARI_FRAME_SKIP):
        raise ValueError(
            f"Atari follows the Atari-100k protocol with a frame skip of {ATARI_FRAME_SKIP} built in; "
            f"action_repeat must be 1 or {ATARI_FRAME_SKIP}, got {action_repeat}"
        )
    env = _BUILDERS[resolved.family](resolved.gym_id, obs=obs, image_size=image_size, render=render)
    if action_repeat > 1 and resolved.family != "atari":
        env = RepeatAction(env, action_repeat)
    if time_limit is not None:
        env = TimeLimit(env, max_episode_steps=time_limit)
    if held_out:
        env = HeldOutInstructions(env, held_out, only=held_out_only)
    # Here it sees raw observations (the mission string, before tokens) and every episode end, time limits included.
    env = wrap_env(env, reward)
    # Text entries become int64 token ids first; DictObservation keeps those boxes as they are.
    env, tokens = wrap_text(adapt_action_space(env), vocabularies, text_length)
    env = DictObservation(env, keep=tokens)
    env.metadata = {**env.metadata, FRAMES_PER_STEP_KEY: _count_frames_per_step(env)}
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def _restarting_env(env_id: str, seed: int, cut_nonfinite: bool, make_env_kwargs: dict) -> gym.Env:
    """make_env wrapped so that an exception in step or reset rebuilds it (with a fresh seed)."""
    def factory(restarts: int | None) -> gym.Env:
        env = make_env(env_id, seed=seed + 7919 * (restarts or 0), **make_env_kwargs)
        return CutNonFinite(env) if cut_nonfinite else env
    return RestartOnError(factory)


def make_vector_env(
    env_id: str, num_envs: int, *, seed: int, asynchronous: bool = False, cut_nonfinite: bool = False,
    **make_env_kwargs
) -> gym.vector.VectorEnv:
    """``num_envs`` copies of ``make_env(env_id, **make_env_kwargs)`` seeded seed, seed+1, ...

    Autoreset is gymnasium's NEXT_STEP mode: the step that ends an episode (terminated or truncated)
    returns its last observation as usual; the *next* ``step`` call ignores the action for that
    sub-env, resets it and returns its first observation with reward 0 and terminated = truncated =
    False. The collector marks that step ``is_first`` itself (and stores a zero action for it).

    Each sub-env is wrapped in ``RestartOnError``: an exception inside it rebuilds it and ends its
    episode as truncated, with ``infos["env_error"]`` naming the exception. With ``cut_nonfinite`` a
    NaN or infinite reward or observation ends the episode the same way (``CutNonFinite``), with
    ``infos["env_nonfinite"]`` naming the entries.

    Text observations: all sub-envs share ``vocabularies`` (one made here when none is given).
    """
    # One vocabulary object for all sub-envs, so that a growing text vocabulary gives every env the same ids
    # (subprocess envs get copies: lit_dreamer.envs.text.check_text_growth refuses those when they grow).
    make_env_kwargs = {**make_env_kwargs, "vocabularies": make_env_kwargs.get("vocabularies") or TextVocabularies()}
    env_fns = [functools.partial(_restarting_env, env_id, seed + index, cut_nonfinite, make_env_kwargs)
               for index in range(num_envs)]
    vector_class = gym.vector.AsyncVectorEnv if asynchronous else gym.vector.SyncVectorEnv
    envs = vector_class(env_fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    return wrap_vector_env(envs, make_env_kwargs.get("reward"))  # a language model judges all envs' episodes together


def close_by_force(envs: gym.vector.VectorEnv) -> None:
    """Close a vector env whose own close() failed, for good.

    A dead subprocess fails AsyncVectorEnv.close(): it first waits on the pending step, whose pipe
    is broken, and raises before it marks itself closed. Its __del__ then retries the close at some
    later garbage collection, where it fails again: an ignored exception reported at an arbitrary
    point of the program (under CPython 3.11 that report once broke an unrelated ast.parse). Here the
    workers are terminated, the pipes closed, and the env marked closed so that nothing retries.
    """
    base = envs.unwrapped
    for process in getattr(base, "processes", []):
        if process.is_alive():
            process.terminate()
        process.join(timeout=5)
    for pipe in getattr(base, "parent_pipes", []):
        if pipe is not None:
            pipe.close()
    base.closed = True

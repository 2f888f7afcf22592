"""Run whole episodes with a DreamerModule's policy: used by the eval callback and the eval command."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from lit_dreamer.envs import action_kind, env_action
from lit_dreamer.options import at_least, checked, one_of


@dataclass
class EpisodeStats:
    returns: list[float]
    lengths: list[int]
    successes: list[bool] = field(default_factory=list)
    """Per episode, when the env reports `success` in the final info of its episodes (else empty)."""

    @classmethod
    def pooled(cls, parts: Iterable[EpisodeStats]) -> EpisodeStats:
        """The episodes of several runs (e.g. one per task) as one set; successes of the runs that report them."""
        parts = list(parts)
        return cls([r for p in parts for r in p.returns], [n for p in parts for n in p.lengths],
                   [s for p in parts for s in p.successes])

    def summary(self) -> dict[str, float]:
        """Return and length statistics, and the success rate where the env reports success."""
        r = np.asarray(self.returns, np.float64)
        summary = {"return": float(r.mean()), "return_std": float(r.std()), "return_min": float(r.min()),
                   "return_max": float(r.max()), "length": float(np.mean(self.lengths)), "episodes": len(r)}
        if self.successes:
            summary["success"] = float(np.mean(self.successes))
        return summary


def final_successes(infos: dict, ended: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(reported, success) per sub-env of a vector step's infos, for the sub-envs whose episode `ended` there."""
    reported = np.asarray(infos.get("_success", np.zeros(len(ended), bool)), bool) & ended
    success = np.asarray(infos.get("success", np.zeros(len(ended), bool)), bool) & reported
    return reported, success


@torch.no_grad()
def run_episodes(module, envs, *, mode: str = "mode", seed: int = 0, max_steps: int = 1_000_000,
                 task: int = 0, rolled_keys: tuple[str, ...] = ()) -> EpisodeStats:
    """One episode in each sub-env of a gymnasium vector env, acting with `module.act` for task number `task`.

    mode="mode" acts with the policy's most likely action (deterministic evaluation);
    mode="sample" samples as during training. Steps after a sub-env's episode ended are ignored.
    `rolled_keys`: observation keys the policy of sub-env i reads from sub-env i-1 (`eval text=shuffled`).
    """
    n = envs.num_envs
    discrete = action_kind(envs) == "discrete"
    obs, _ = envs.reset(seed=seed)
    carry = module.initial_carry(n)
    is_first = torch.ones(n, dtype=torch.bool, device=module.device)
    tasks = torch.full((n,), task, dtype=torch.long, device=module.device)
    done, reported, success = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    returns, lengths = np.zeros(n), np.zeros(n, np.int64)
    for _ in range(max_steps):
        tensors = {k: torch.as_tensor(v, device=module.device) for k, v in obs.items()}
        for key in rolled_keys:
            tensors[key] = torch.roll(tensors[key], 1, 0)
        action, carry, _ = module.act(tensors, is_first, carry, mode=mode, task=tasks)
        action = action.float().cpu().numpy()
        obs, reward, terminated, truncated, infos = envs.step(env_action(action, discrete))
        live = ~done
        returns[live] += reward[live]
        lengths[live] += 1
        ended = live & (np.asarray(terminated) | np.asarray(truncated))
        ended_reported, ended_success = final_successes(infos, ended)
        reported |= ended_reported
        success |= ended_success
        done |= ended
        is_first = torch.zeros(n, dtype=torch.bool, device=module.device)
        if done.all():
            break
    # An env that reports success somewhere counts an episode without the report (say, cut by a time
    # limit outside it) as a failure; one that never reports it adds nothing.
    successes = [bool(s) for s in success] if reported.any() else []
    return EpisodeStats([float(r) for r in returns], [int(x) for x in lengths], successes)


# --------------------------------------------------------------------------------------------------
# `python -m lit_dreamer eval --ckpt PATH`

# The evaluation policy, one vocabulary for run.eval_mode and `eval mode=`: the policy's most likely
# action, or a sample as in training. The eval command's first names stay accepted for old scripts.
EVAL_MODES = ("mode", "sample")
DEPRECATED_EVAL_MODES = {"deterministic": "mode", "stochastic": "sample"}


check_eval_mode = one_of(EVAL_MODES, "the most likely action, or sampled as in training")


def eval_mode(value: str, key: str = "mode") -> str:
    """`value` as one of EVAL_MODES; an old alias is mapped with one deprecation line on stderr."""
    if value in DEPRECATED_EVAL_MODES:
        new = DEPRECATED_EVAL_MODES[value]
        print(f"warning: {key}={value} is deprecated and will be removed; use {key}={new}", file=sys.stderr)
        return new
    return check_eval_mode(value, key)


INSTRUCTION_SETS = ("train", "held_out")
check_instruction_set = one_of(INSTRUCTION_SETS, "the run's instructions, or only those holding a phrase of its "
                                                 "env.held_out")
TEXT_SOURCES = ("own", "shuffled")
check_text_source = one_of(TEXT_SOURCES, "each episode's own text observations, or another episode's")


@dataclass
class EvalOptions:
    """The `key=value` options of `python -m lit_dreamer eval` (parsed by lit_dreamer.options)."""

    episodes: int = checked(10, at_least(1))
    """Episodes to run, one per env, all in parallel (at least 1)."""
    mode: str = checked("mode", eval_mode, shown="|".join(EVAL_MODES))
    """The policy, mode=mode|sample: its most likely action (the default) or sampled as in training;
    deterministic|stochastic are deprecated aliases of mode|sample."""
    seed: int = checked(12345, at_least(0))
    """Seed of the envs and of the policy's sampling."""
    tracking_uri: str | None = None
    """MLflow store of the eval run (None: the training run's logger.tracking_uri); given, the eval run goes
    to MLflow even when the run used another logger.backend."""
    instructions: str = checked("train", check_instruction_set, shown="|".join(INSTRUCTION_SETS))
    """Episodes whose instruction the run trained on (train, the default), or only those holding a phrase of the
    run's env.held_out (held_out: generalization to instructions it never saw)."""
    text: str = checked("own", check_text_source, shown="|".join(TEXT_SOURCES))
    """What the policy reads as its text observations (the instruction): each episode's own (the default), or
    another episode's (shuffled: episode i's policy reads episode i-1's text, the env still judges episode i's),
    a control that shows whether the policy uses its instruction. shuffled needs episodes >= 2 and a checkpoint
    that reads text; a video shows an episode with its own text."""
    video: str | None = None
    """Also write a GIF of one episode here, e.g. video=episode.gif (None: no video); with several tasks one per
    task, episode-<task>.gif."""


def load_module(ckpt_path: str):
    """The DreamerModule of a checkpoint (loaded with weights_only=True) and the run config it carries."""
    module, cfg, _ = load_checkpoint(ckpt_path)
    return module, cfg


def load_checkpoint(ckpt_path: str):
    """(module, run config, MLflow run id of the training run or None) of a checkpoint."""
    from lit_dreamer.resume import read_checkpoint
    return module_of(read_checkpoint(ckpt_path, mmap=False))


def module_of(info):
    """(module, run config, MLflow run id or None) of a checkpoint already read (a CheckpointInfo)."""
    from lit_dreamer.config import from_container
    from lit_dreamer.module import DreamerModule
    hp = info.hparams
    obs_spec = {k: (tuple(shape), dtype) for k, (shape, dtype) in hp["obs_spec"].items()}
    module = DreamerModule(obs_spec, hp["action_dim"], hp["discrete"], hp["config"], num_tasks=hp.get("num_tasks", 1),
                           text_words=info.text_vocabulary, one_hot=hp.get("one_hot"))
    module.load_state_dict(info.state_dict)
    module.eval()
    config, run_id = info.run_config, info.mlflow_run_id
    if config is None:  # a checkpoint made before checkpoints carried their config
        config, run_id = config_of_run_folder(info.path)
    return module, from_container(config), run_id


def config_of_run_folder(ckpt_path: str) -> tuple[dict, str | None]:
    """config.yaml and mlflow_run_id of the run folder an older checkpoint really sits in (R/checkpoints/step-*/)."""
    from omegaconf import OmegaConf

    from lit_dreamer.config import ConfigError
    from lit_dreamer.resume import CONFIG_FILE, run_folder_of
    folder = run_folder_of(ckpt_path)
    config_file = os.path.join(folder, CONFIG_FILE) if folder else None
    if config_file is None or not os.path.isfile(config_file):
        raise ConfigError(f"checkpoint {ckpt_path} carries no config (it predates that) and does not sit in a run "
                          "folder's checkpoints/step-*/ with its config.yaml; evaluate it where its run saved it")
    id_file = os.path.join(folder, "mlflow_run_id")
    run_id = open(id_file).read().strip() if os.path.isfile(id_file) else None
    return OmegaConf.to_container(OmegaConf.load(config_file)), run_id or None


def evaluate_checkpoint(ckpt_path: str, options: EvalOptions, env_overrides: dict | None = None) -> dict:
    """Run episodes of each task of a checkpoint with its policy; log an eval run to MLflow linked to the
    training run. `episodes` run per task; an `env.id` override evaluates that one env instead."""
    from lit_dreamer.config import task_names
    module, cfg, training_run_id = load_checkpoint(ckpt_path)
    vocabularies = checkpoint_vocabularies(ckpt_path, module)
    trained_on = task_names(cfg)
    for key, value in (env_overrides or {}).items():
        setattr(cfg.env, key, value)
    if "id" in (env_overrides or {}) and "tasks" not in env_overrides:
        cfg.env.tasks = []  # env.id=X asks for that one env, not the checkpoint's task list
    tasks = task_names(cfg)
    if not tasks:
        from lit_dreamer.config import ConfigError
        raise ConfigError(f"checkpoint {ckpt_path} was trained offline without an env; name the env to evaluate it "
                          "in with env.id=ID")
    if options.instructions == "held_out" and not cfg.env.held_out:
        from lit_dreamer.config import ConfigError
        raise ConfigError("instructions=held_out evaluates on the phrases the run held out, and this run held none "
                          "out; train with env.held_out=[red ball,...] or pass env.held_out=[...] to eval")
    if options.text == "shuffled":
        check_shuffled_text(module, options)
    torch.manual_seed(options.seed)
    per_task = {task: evaluate_task(module, task, k, cfg, options, policy_task(module, task, trained_on), vocabularies)
                for k, task in enumerate(tasks)}
    stats = EpisodeStats.pooled(per_task.values())
    result = {"summary": stats.summary(), "returns": stats.returns, "lengths": stats.lengths,
              "env": ",".join(tasks), "checkpoint": os.path.abspath(ckpt_path)}
    if options.text == "shuffled":
        result["text"] = options.text
    if len(tasks) > 1:
        result["tasks"] = {task: task_stats.summary() for task, task_stats in per_task.items()}
    if options.video:
        result.update(record_videos(module, tasks, trained_on, cfg, options, vocabularies))
    if cfg.logger.backend == "mlflow" or options.tracking_uri:
        videos = list(result["videos"].values()) if "videos" in result else [result.get("video")]
        result["mlflow_run_id"] = log_eval_run(ckpt_path, cfg, options, stats, [v for v in videos if v],
                                               training_run_id, result.get("tasks"),
                                               reads_text=bool(module.world_model.text_keys))
    else:  # the run logged to TensorBoard, CSV or nowhere: the table goes beside its other files
        result["csv"] = write_eval_csv(os.path.join(eval_csv_folder(ckpt_path), EVAL_CSV), result, options)
    return result



def check_shuffled_text(module, options: EvalOptions) -> None:
    """text=shuffled needs text observations the policy reads and at least two episodes to swap them between."""
    from lit_dreamer.config import ConfigError
    if not module.world_model.text_keys:
        raise ConfigError("text=shuffled swaps the text observations between episodes, and this checkpoint reads "
                          "none (no text key, or model.mlp_keys leaves them out); evaluate it with text=own")
    if options.episodes < 2:
        raise ConfigError(f"text=shuffled swaps the text observations between episodes and needs at least 2, got "
                          f"episodes={options.episodes}")


def checkpoint_vocabularies(ckpt_path: str, module):
    """The text vocabularies the checkpoint's envs grew or declared, so that eval envs give the same token ids."""
    from lit_dreamer.envs.text import TextVocabularies
    from lit_dreamer.resume import read_checkpoint
    return TextVocabularies(module.cfg.model.text_vocab, read_checkpoint(ckpt_path).text_vocabulary)


def record_videos(module, tasks: list[str], trained_on: list[str], cfg, options: EvalOptions,
                  vocabularies=None) -> dict:
    """One episode's GIF at options.video ({"video", "video_return"}); with several tasks one per task at
    <stem>-<task><ext> ({"videos", "video_returns"}, keyed by task), <task> as in eval/<task>/return."""
    from lit_dreamer.config import task_metric_name
    from lit_dreamer.video import record_episode, write_gif
    stem, ext = os.path.splitext(options.video)
    paths, returns = {}, {}
    for task in tasks:
        frames, returns[task] = record_episode(module, task, mode=options.mode, seed=options.seed, max_steps=100_000,
                                               task=policy_task(module, task, trained_on), **cfg.env.make_kwargs(),
                                               vocabularies=vocabularies,
                                               held_out_only=options.instructions == "held_out")
        path = options.video if len(tasks) == 1 else f"{stem}-{task_metric_name(task)}{ext or '.gif'}"
        paths[task] = write_gif(frames, path)
    if len(tasks) == 1:
        return {"video": paths[tasks[0]], "video_return": returns[tasks[0]]}
    return {"videos": paths, "video_returns": returns}


def policy_task(module, task: str, trained_on: list[str]) -> int:
    """The task index the policy acts for in env `task`: its index in the checkpoint's task table."""
    if task in trained_on:
        return trained_on.index(task)
    if module.cond.active:
        from lit_dreamer.config import ConfigError
        raise ConfigError(f"{task!r} is not one of the tasks this checkpoint was trained on ({', '.join(trained_on)}), "
                          "and its policy acts for one of them; evaluate one of those, or adapt the checkpoint to "
                          f"the new task first (fit init.ckpt=CHECKPOINT env.id={task})")
    return 0


def evaluate_task(module, task: str, index: int, cfg, options: EvalOptions, policy: int = 0,
                  vocabularies=None) -> EpisodeStats:
    """`options.episodes` episodes of one task; task number `index` seeds its envs apart (task 0: options.seed);
    the policy acts for task number `policy` of the checkpoint's table; `vocabularies`: the checkpoint's text
    vocabularies (lit_dreamer.envs.text)."""
    rolled = tuple(module.world_model.text_keys) if options.text == "shuffled" else ()
    return task_episodes(module, task, options.episodes, seed=options.seed, index=index, mode=options.mode,
                         policy=policy, rolled_keys=rolled, **cfg.env.make_kwargs(), vocabularies=vocabularies,
                         held_out_only=options.instructions == "held_out")


def task_episodes(module, env_id: str, episodes: int, *, seed: int, index: int, mode: str, policy: int,
                  rolled_keys: tuple[str, ...] = (), **env_kwargs) -> EpisodeStats:
    """`episodes` episodes of env `env_id` in fresh envs, the policy acting for task number `policy`; task
    number `index` of a table gets seeds of its own (seed + index * TASK_SEED_STRIDE; task 0: seed);
    `rolled_keys` as in run_episodes."""
    from lit_dreamer.envs import TASK_SEED_STRIDE, make_vector_env
    seed = seed + index * TASK_SEED_STRIDE
    envs = make_vector_env(env_id, episodes, seed=seed, **env_kwargs)
    try:
        return run_episodes(module, envs, mode=mode, seed=seed, task=policy, rolled_keys=rolled_keys)
    finally:
        envs.close()


def eval_csv_folder(ckpt_path: str) -> str:
    """The run folder the checkpoint sits in (R/checkpoints/step-*/model.ckpt), else the checkpoint's own folder."""
    from lit_dreamer.resume import run_folder_of
    return run_folder_of(ckpt_path) or os.path.dirname(os.path.abspath(ckpt_path))


EVAL_CSV = "eval.csv"
EVAL_CSV_COLUMNS = ("time", "checkpoint", "env", "mode", "seed", "episodes", "return", "return_std", "return_min",
                    "return_max", "length", "success", "instructions", "text")


def write_eval_csv(path: str, result: dict, options: EvalOptions) -> str:
    """Append one row (the printed table's numbers) to the run's eval CSV; a header when the file is new.
    `success` is empty for envs that do not report it; a file written before a column keeps its header."""
    import csv
    import time
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": result["checkpoint"], "env": result["env"],
           "mode": options.mode, "seed": options.seed, **result["summary"], "instructions": options.instructions,
           "text": options.text}
    new = not os.path.isfile(path)
    columns = EVAL_CSV_COLUMNS
    if not new:
        with open(path, newline="") as f:
            columns = tuple(next(csv.reader(f), None) or EVAL_CSV_COLUMNS)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


def log_eval_run(ckpt_path: str, cfg, options: EvalOptions, stats: EpisodeStats, videos: list[str] | None = None,
                 training_run_id: str | None = None, result_tasks: dict | None = None, reads_text: bool = False) -> str:
    """An MLflow run of this evaluation, under the training run when that run is in the same store;
    `result_tasks` ({task: summary}, several tasks only) adds eval/<task>/return and eval/<task>/length (and
    eval/<task>/success where the env reports success); `reads_text`: the policy reads text observations, and
    the run records whose it read (the `text` option)."""
    import mlflow

    from lit_dreamer.config import task_metric_name
    from lit_dreamer.tracking import KIND_TAG, ready_store
    uri = options.tracking_uri or cfg.logger.tracking_uri
    ready_store(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.logger.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.logger.experiment)
    parent = training_run_id if training_run_id and run_exists(client, training_run_id) else None
    tags = {KIND_TAG: "eval"}  # compare leaves eval runs out unless asked (kinds=eval)
    if parent:
        tags["mlflow.parentRunId"] = parent  # shows the eval run under its training run in the MLflow UI
    run = client.create_run(experiment_id, tags=tags, run_name=f"eval-{cfg.logger.run_name or 'run'}")
    run_id = run.info.run_id
    env = {"env.tasks": str(list(cfg.env.tasks))} if cfg.env.tasks else {"env.id": cfg.env.id}
    for key, value in {"checkpoint": os.path.abspath(ckpt_path), **env, "episodes": options.episodes,
                       "mode": options.mode, "seed": options.seed}.items():
        client.log_param(run_id, key, value)
    if cfg.env.held_out:  # which instructions the episodes had: the trained ones, or only the held-out phrases
        client.log_param(run_id, "instructions", options.instructions)
        client.log_param(run_id, "env.held_out", str(list(cfg.env.held_out)))
    if reads_text:  # each episode's own instruction, or another's (the control)
        client.log_param(run_id, "text", options.text)
    summary = stats.summary()
    for key in ("return", "return_std", "return_min", "return_max", "length", "success"):
        if key in summary:  # success only where the env reports it
            client.log_metric(run_id, f"eval/{key}", summary[key])
    for task, task_summary in (result_tasks or {}).items():
        for key in ("return", "length", "success"):
            if key in task_summary:
                client.log_metric(run_id, f"eval/{task_metric_name(task)}/{key}", task_summary[key])
    for index, (ret, length) in enumerate(zip(stats.returns, stats.lengths)):
        client.log_metric(run_id, "eval/episode_return", ret, step=index)
        client.log_metric(run_id, "eval/episode_length", length, step=index)
    for video in videos or []:
        client.log_artifact(run_id, video, artifact_path="videos")
    client.set_terminated(run_id)
    return run_id


def format_table(result: dict) -> str:
    s = result["summary"]
    shuffled = " (text=shuffled: each episode's policy read another episode's text)" if "text" in result else ""
    lines = [f"{result['env']}: {s['episodes']} episodes of {result['checkpoint']}{shuffled}",
             f"{'mean':>10} {'std':>10} {'min':>10} {'max':>10} {'length':>10}",
             f"{s['return']:>10.2f} {s['return_std']:>10.2f} {s['return_min']:>10.2f} {s['return_max']:>10.2f} "
             f"{s['length']:>10.1f}"]
    for task, t in result.get("tasks", {}).items():  # several tasks: one line each, after the mean over them
        lines.append(f"{t['return']:>10.2f} {t['return_std']:>10.2f} {t['return_min']:>10.2f} {t['return_max']:>10.2f} "
                     f"{t['length']:>10.1f}  {task}")
    if "success" in s:  # envs that report success in their final info (MiniGrid, BabyAI)
        tasks = result.get("tasks", {})
        per_task = "".join(f", {task} {t['success']:.2f}" for task, t in tasks.items() if "success" in t)
        lines.append(f"success rate {s['success']:.2f}{per_task}")
    return "\n".join(lines)


def run_exists(client, run_id: str) -> bool:
    """Whether the store holds this run (a copied checkpoint may come from another store)."""
    from mlflow.exceptions import MlflowException
    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True

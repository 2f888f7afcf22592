"""CollapseWatch: warn when the policy's entropy has collapsed, the return does not rise and the critic lags.

On a small gradient budget the critic can lag the returns; then nearly every advantage has the same
sign (`ac/advantage_sign_bias` = mean / mean |advantage| near +1 or -1), the actor's updates are mostly
noise around that offset, and the policy can turn near-deterministic before it has learned anything.
This callback makes that visible. Every `run.log_every` training steps it compares:

- the policy's entropy (`ac/entropy`, logged by the training step) with its first logged value:
  *collapsed* when it is below `fraction` of it. Entropy is summed over action dimensions, so the
  comparison is the same per action dimension; a policy whose first entropy is <= 0 is not checked;
- the return: the eval return where evaluation runs (`run.eval_every`), otherwise the training
  episodes' return. *Not rising* when the mean of the records of the last `window` env steps is no
  higher than the first record (it never left its start), or is lower than the mean of the window
  before (it fell); "higher" and "lower" by more than 5% of the range of all records so far;
- the advantages: *biased* when the mean of `ac/advantage_sign_bias` read at the checks of the last
  `window` env steps is at least 0.5 in size (most advantages share one sign: the critic lags).

When all three hold it logs `collapse/suspected` = 1 (0 at every other check) and warns once, again only
after a check has cleared it; `collapse/entropy_ratio` (entropy / first entropy) is logged at every check.
A run whose return stays at its best after converging has low entropy but is not falling, so it does not
warn. The bias condition keeps apart the dips every cartpole-balance run goes through with a centred
critic: a continuous policy's entropy falls far in normal learning, and the untrained balance policy
scores higher than the first trained ones.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_dreamer.callbacks.env_collector import find_collector, run_step_count
from lit_dreamer.callbacks.evaluation import EvalCallback

TOLERANCE = 0.05
"""Changes of the return smaller than this share of the range of all records so far count as none."""
BIASED = 0.5
"""|mean sign bias| over the window from which the advantages count as biased."""


def mean_in(records: list[tuple[int, float]], low: int, high: int) -> float | None:
    """Mean of the records with low < env steps <= high (None: there are none)."""
    values = [value for steps, value in records if low < steps <= high]
    return sum(values) / len(values) if values else None


def return_stalled(records: list[tuple[int, float]], now: int, window: int) -> bool:
    """Whether the return has not risen: the last window's mean is at the first record's level, or fell.

    records: (env steps, return) in order. Needs a record older than the last window, so that the
    window's mean is compared with something it could have risen from.
    """
    if not records or records[0][0] > now - window:
        return False
    recent = mean_in(records, now - window, now)
    if recent is None:
        return False
    values = [value for _, value in records]
    tolerance = TOLERANCE * (max(values) - min(values))
    never_left_start = recent <= records[0][1] + tolerance
    before = mean_in(records, now - 2 * window, now - window)
    fell = before is not None and recent < before - tolerance
    return never_left_start or fell


def collapse_suspected(entropy_ratio: float, fraction: float, sign_bias: list[tuple[int, float]],
                       records: list[tuple[int, float]], now: int, window: int) -> bool:
    """The three conditions of the module doc: entropy collapsed, return not rising, advantages biased."""
    bias = mean_in(sign_bias, now - window, now)
    return (entropy_ratio < fraction and bias is not None and abs(bias) >= BIASED
            and return_stalled(records, now, window))


class CollapseWatch(Callback):
    """Logs `collapse/entropy_ratio` and `collapse/suspected`, and warns on a suspected collapse (module doc).

    Args:
        fraction: the entropy counts as collapsed below this share of its first logged value (0: off).
        window: env steps over which the return must rise.
        every: check every this many training steps (each check reads the entropy on the host once).
    """

    def __init__(self, fraction: float = 0.2, window: int = 5000, every: int = 10):
        super().__init__()
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), got {fraction}")
        if window <= 0:
            raise ValueError(f"window must be a positive number of env steps, got {window}")
        self.fraction, self.window, self.every = fraction, window, max(1, every)
        self.initial_entropy: float | None = None
        self.records: list[tuple[int, float]] = []
        self.sign_bias: list[tuple[int, float]] = []  # (env steps, ac/advantage_sign_bias) at each check
        self.source: str | None = None  # "eval" or "train": which returns the records are
        self.seen = {"eval": 0, "train": 0}  # records already taken from each source
        self.warned = False
        self.checks = 0  # training steps seen by this process

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.fraction <= 0:
            return
        self.checks += 1
        # The first step too: its entropy is the untrained policy's, the reference for the ratio.
        if self.checks % self.every and self.initial_entropy is not None:
            return
        metrics = trainer.callback_metrics
        if "ac/entropy" not in metrics or "ac/advantage_sign_bias" not in metrics:
            return
        entropy, bias = float(metrics["ac/entropy"]), float(metrics["ac/advantage_sign_bias"])  # host reads
        if self.initial_entropy is None:
            self.initial_entropy = entropy
        now = run_step_count(trainer)
        self.take_returns(trainer)
        if math.isfinite(bias):
            self.sign_bias.append((now, bias))
            self.sign_bias = [item for item in self.sign_bias if item[0] > now - self.window]
        if not trainer.is_global_zero or self.initial_entropy <= 0 or not math.isfinite(entropy):
            return
        ratio = entropy / self.initial_entropy
        suspected = collapse_suspected(ratio, self.fraction, self.sign_bias, self.records, now, self.window)
        if trainer.logger is not None:
            trainer.logger.log_metrics({"collapse/entropy_ratio": ratio, "collapse/suspected": float(suspected)},
                                       step=now)
        if suspected and not self.warned:
            rank_zero_warn(
                f"possible policy collapse at {now} env steps: the policy's entropy is {ratio:.1%} of its first value "
                f"({entropy:.3g} against {self.initial_entropy:.3g}) and the {self.source} return has not risen over "
                f"the last {self.window} env steps, while most advantages share one sign (ac/advantage_sign_bias "
                f"{mean_in(self.sign_bias, now - self.window, now):+.2f}): the critic lags the returns (docs/results.md, "
                "'One recipe'). Set run.collapse_entropy=0 to turn this check off.")
        self.warned = suspected

    def take_returns(self, trainer: L.Trainer) -> None:
        """Append the returns logged since the last check: eval returns once any exist, else training ones."""
        evals = [cb for cb in trainer.callbacks if isinstance(cb, EvalCallback)]
        eval_history = evals[0].history if evals else []
        if eval_history and self.source != "eval":
            self.source, self.records = "eval", []  # eval supersedes the training returns from its first record
            self.seen["eval"] = 0
        if self.source == "eval":
            new = [(steps, float(summary["return"])) for steps, summary in eval_history[self.seen["eval"]:]]
            self.seen["eval"] = len(eval_history)
        else:
            collector = find_collector(trainer)
            log = collector.return_log if collector is not None else []
            new = log[self.seen["train"]:]
            self.seen["train"] = len(log)
            self.source = "train"
        self.records.extend(new)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"initial_entropy": self.initial_entropy, "records": [list(r) for r in self.records],
                "sign_bias": [list(b) for b in self.sign_bias], "source": self.source, "warned": self.warned}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial_entropy = state_dict["initial_entropy"]
        self.records = [(int(steps), float(value)) for steps, value in state_dict["records"]]
        self.sign_bias = [(int(steps), float(value)) for steps, value in state_dict.get("sign_bias", [])]
        self.source, self.warned = state_dict["source"], state_dict["warned"]
        # The eval and collector histories start empty after a resume: count new records from there.
        self.seen = {"eval": 0, "train": 0}

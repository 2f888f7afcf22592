"""Hyperparameters of the agent with the paper's defaults, and the model size presets.

YAML configs only override these; the docstring of each field is what `fit --help` shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

# Section 6 of the spec: stoch K = 32 everywhere, 8 GRU blocks.
SIZES: dict[str, dict[str, int]] = {
    "size1m": dict(deter=512, hidden=64, classes=4, depth=4, units=64),
    "size12m": dict(deter=2048, hidden=256, classes=16, depth=16, units=256),
    "size25m": dict(deter=3072, hidden=384, classes=24, depth=24, units=384),
    "size50m": dict(deter=4096, hidden=512, classes=32, depth=32, units=512),
    "size100m": dict(deter=6144, hidden=768, classes=48, depth=48, units=768),
    "size200m": dict(deter=8192, hidden=1024, classes=64, depth=64, units=1024),
    "size400m": dict(deter=12288, hidden=1536, classes=96, depth=96, units=1536),
}


@dataclass
class ModelConfig:
    """Network sizes. `size` picks a preset; any dimension set here overrides the preset."""

    size: str = "size1m"
    """Preset name: one of size1m, size12m, size25m, size50m, size100m, size200m, size400m."""
    deter: int | None = None
    """Deterministic (GRU) state size; None takes the preset's."""
    hidden: int | None = None
    """RSSM hidden layer width; None takes the preset's."""
    classes: int | None = None
    """Classes C per categorical latent; None takes the preset's."""
    depth: int | None = None
    """CNN channel multiplier; None takes the preset's."""
    units: int | None = None
    """MLP width of encoder, decoder and heads; None takes the preset's."""
    cnn_mults: list[int] = field(default_factory=lambda: [2, 3, 4, 4])
    """CNN stage channels as multiples of depth; each stage halves the image size."""
    cnn_kernel: int = 5
    """CNN kernel size of encoder and decoder."""
    cnn_strided: bool = False
    """Stride-2 convs (decoder: transposed) instead of conv + 2x2 max-pool / upsample + conv; a reference-code option."""
    dense_bias: bool = True
    """Zero-initialized bias in the Linear before each RMSNorm (the reference code's Linear). Without it a layer
    sees only the direction of its input: a 1-dim action's magnitude, or the overall scale of an observation
    vector, is lost. Checkpoints made before this key existed load with it off."""
    decoder_projection_norm: bool = True
    """RMSNorm + SiLU after the image decoder's Linear projection, as after every hidden layer (reference code).
    Off, Linear -> upsample -> conv compose into one linear map. Checkpoints made before this key load with it off."""
    stoch: int = 32
    """Number K of categorical latents."""
    blocks: int = 8
    """Blocks of the block-diagonal GRU."""
    encoder_layers: int = 3
    """Layers of the vector encoder and decoder MLPs."""
    reward_layers: int = 1
    """Hidden layers of the reward head."""
    cont_layers: int = 1
    """Hidden layers of the continue head."""
    actor_layers: int = 3
    """Hidden layers of the policy."""
    critic_layers: int = 3
    """Hidden layers of the critic."""
    prior_layers: int = 2
    """Hidden layers of the prior (dynamics predictor)."""
    post_layers: int = 1
    """Hidden layers of the posterior (representation model)."""
    unimix: float = 0.01
    """Uniform mixture of the categorical latents and the discrete policy."""
    bins: int = 255
    """Bins of the two-hot reward and critic heads."""
    cnn_keys: str = ".*"
    """Regex: image observation keys (uint8 HxWxC) read by the CNN encoder and decoder."""
    mlp_keys: str = ".*"
    """Regex: vector observation keys read by the MLP encoder and decoder (and text keys, by the text encoder)."""
    text_encoder: str = "tokens"
    """Encoder of text observations (int64 token ids, lit_dreamer.envs.text): tokens, a learned word embedding
    mean-pooled over the words, then an MLP, whose decoder predicts each token back; or minilm, the frozen
    all-MiniLM-L6-v2 sentence embedding of the words (lit_dreamer.minilm, cached per distinct text), then an MLP,
    whose decoder predicts that fixed embedding (MSE)."""
    text_vocab: int = 256
    """Text vocabulary entries V, padding and out-of-vocabulary included: token ids are 0 .. V-1."""
    text_embed: int = 32
    """Width of the learned word embedding of model.text_encoder=tokens."""
    text_condition: bool = False
    """Also append the text encoder's output (the instruction's embedding, stopped gradient for the actor and
    critics) to the latent features that the reward and continue heads, actor and critics read: the
    conditioning vector of lit_dreamer.conditioning, fed from text. Needs a text observation key."""
    one_hot_decoder: str = "mse"
    """Decoder loss of the vector keys an env declares one-hot (Discrete and MultiDiscrete observations,
    MiniGrid's cells: lit_dreamer.envs.adapters.ONE_HOT_METADATA_KEY): mse, the symlog squared error of every
    vector key (DreamerV3); or categorical, one softmax per one-hot group and its cross-entropy."""
    grid_encoder: str = "mlp"
    """Network of the vector keys an env declares a square grid of one-hot cells (MiniGrid's view: the same
    group widths repeated over 7 x 7 cells): mlp, the vector MLP, which reads every cell through weights of its
    own; or conv, two 3x3 convolutions over the cells (model.units channels) whose weights every cell shares,
    encoding and decoding (lit_dreamer.nets.GridEncoder, GridDecoder)."""

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> "ModelConfig":
        """The model config a checkpoint saved, with every key it predates filled in as it was made.

        Keys it lacks take their LEGACY_MODEL_DEFAULTS value, never today's default: a checkpoint written
        before `dense_bias` existed has no biases, whatever ModelConfig now defaults to.
        """
        unknown = sorted(set(saved) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"saved model config has keys this version does not know: {', '.join(unknown)}")
        legacy = {k: v for k, v in LEGACY_MODEL_DEFAULTS.items() if k not in saved}
        return cls(**legacy, **saved)

    def resolved(self) -> "ModelConfig":
        """A copy with every None dimension filled in from the preset."""
        if self.size not in SIZES:
            raise ValueError(f"unknown model.size {self.size!r}; choose one of {', '.join(SIZES)}")
        preset = SIZES[self.size]
        return replace(self, **{k: v for k, v in preset.items() if getattr(self, k) is None})


# What a checkpoint made before a ModelConfig key existed was built with: the behaviour the code had then,
# which is not always today's default. Keys of the first release are not listed (they were always saved).
LEGACY_MODEL_DEFAULTS: dict[str, Any] = {
    "cnn_mults": [2, 3, 4, 4],
    "cnn_kernel": 5,
    "cnn_strided": False,
    "dense_bias": False,
    "decoder_projection_norm": False,
    # No checkpoint before these had a text observation: any value rebuilds it; today's defaults keep the diff empty.
    "text_encoder": "tokens",
    "text_vocab": 256,
    "text_embed": 32,
    "text_condition": False,
    "one_hot_decoder": "mse",
    "grid_encoder": "mlp",
}

TEXT_ENCODERS = ("tokens", "minilm")
ONE_HOT_DECODERS = ("mse", "categorical")
GRID_ENCODERS = ("mlp", "conv")


@dataclass
class WorldModelConfig:
    """World-model training settings (its network sizes are in `model`, which a checkpoint must match)."""

    free_nats: float = 1.0
    """Free bits of the KL losses: a dynamics or representation KL below this is clamped and not optimized."""


# Keys that moved from one section to another: old dotted key -> new one. A config file, a saved config.yaml or
# a checkpoint's hyperparameters written before the move are read through `migrate_moved_keys`.
MOVED_KEYS: dict[str, str] = {
    "behavior.free_nats": "world_model.free_nats",
}


def migrate_moved_keys(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested config dict (a file's or a checkpoint's, any subset of sections) with moved keys in
    their new place. Raises ValueError when a key is set in both places (which one was meant is unclear)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if not isinstance(out.get(old_section), dict) or old_key not in out[old_section]:
            continue
        value = out[old_section].pop(old_key)
        target = out.setdefault(new_section, {})
        if target is None:
            target = out[new_section] = {}
        if new_key in target:
            raise ValueError(f"{old} and {new} are both set; {old} is the old name of {new}: keep only {new}")
        target[new_key] = value
    return out


@dataclass
class LossScales:
    """Weights of the loss terms; keys must match the loss dict exactly (except con_terminal, a weight inside one)."""

    rec: float = 1.0
    """Reconstruction (every decoded observation key but text ones)."""
    text: float = 1.0
    """Reconstruction of text observations (rec/<text key>: cross-entropy of the tokens, summed over positions)."""
    rew: float = 1.0
    """Reward prediction."""
    con: float = 1.0
    """Continue prediction."""
    con_terminal: float = 1.0
    """Weight of terminal steps inside the continue loss, relative to the other steps (1: the spec's plain
    cross-entropy; not a loss term of its own)."""
    dyn: float = 1.0
    """Dynamics KL (trains the prior)."""
    rep: float = 0.1
    """Representation KL (trains the posterior)."""
    policy: float = 1.0
    """Actor (REINFORCE) loss."""
    value: float = 1.0
    """Critic loss on imagined states."""
    repval: float = 0.3
    """Critic loss on replayed states (its gradient reaches the world model)."""


@dataclass
class BehaviorConfig:
    """Imagination and actor-critic settings."""

    horizon: int = 15
    """Imagination horizon H."""
    gamma: float = 1 - 1 / 333
    """Discount; the per-step discount is gamma times the predicted continue."""
    lam: float = 0.95
    """Lambda of the lambda returns."""
    entropy: float = 3e-4
    """Actor entropy bonus."""
    slow_rate: float = 0.02
    """EMA rate of the slow critic, applied every step."""
    slow_reg: float = 1.0
    """Weight of the slow critic regularizer in the critic loss."""
    advantage_center: bool = False
    """Subtract the batch's weighted mean advantage before the actor loss (off in the spec; a deviation)."""
    retnorm_rate: float = 0.01
    """EMA rate of the return percentile spread."""
    retnorm_limit: float = 1.0
    """Advantages are divided by max(limit, spread)."""
    min_std: float = 0.1
    """Minimum std of the bounded-normal policy."""
    max_std: float = 1.0
    """Maximum std of the bounded-normal policy."""
    replay_context: bool = True
    """Start replayed sequences from the stored posterior of their preceding step (newest recipe)."""


@dataclass
class OptimConfig:
    """LaProp with adaptive gradient clipping, one optimizer per part with these settings."""

    lr: float = 4e-5
    """Learning rate of all three parts unless overridden below."""
    world_model_lr: float | None = None
    """World model learning rate (None: lr)."""
    actor_lr: float | None = None
    """Actor learning rate (None: lr)."""
    critic_lr: float | None = None
    """Critic learning rate (None: lr)."""
    agc: float = 0.3
    """Clip each tensor's gradient norm to agc * max(||param||, pmin)."""
    pmin: float = 1e-3
    """Parameter norm floor of AGC."""
    eps: float = 1e-20
    """Epsilon of the RMS scaling."""
    beta1: float = 0.9
    """Momentum, applied after the RMS scaling."""
    beta2: float = 0.999
    """Decay of the squared-gradient average."""
    warmup: int = 1000
    """Linear learning-rate warmup in gradient steps."""
    max_skipped_steps: int = 20
    """Stop with an error after this many consecutive steps skipped for non-finite losses or gradients."""


@dataclass
class MultitaskConfig:
    """How the task-dependent heads (reward, continue, actor, critic) read the task; no effect with one task."""

    conditioning: str = "embedding"
    """embedding: a learned vector per task (norm at most 1) appended to the latent features of each head;
    heads: shared trunks with one output layer per task. The encoder, RSSM and decoder never see the task."""
    embed_dim: int = 16
    """Size of the task vector of multitask.conditioning=embedding."""


@dataclass
class AgentConfig:
    """Everything the DreamerModule needs besides the spaces."""

    model: ModelConfig = field(default_factory=ModelConfig)
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    loss_scales: LossScales = field(default_factory=LossScales)
    behavior: BehaviorConfig = field(default_factory=BehaviorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)


def agent_config_from(config: AgentConfig | dict | None) -> AgentConfig:
    """Accept an AgentConfig, a plain nested dict as a checkpoint saves it, or None (defaults).

    A dict is read as saved: a model key it predates takes the value it was made with (ModelConfig.from_saved),
    so that `load_from_checkpoint` and `eval` rebuild an old checkpoint's architecture, not today's; a key
    saved in the section it has since left is read from there (migrate_moved_keys).
    """
    if config is None:
        return AgentConfig()
    if isinstance(config, AgentConfig):
        return config
    config = migrate_moved_keys(config)
    return AgentConfig(
        model=ModelConfig.from_saved(config.get("model", {})),
        world_model=WorldModelConfig(**config.get("world_model", {})),
        loss_scales=LossScales(**config.get("loss_scales", {})),
        behavior=BehaviorConfig(**config.get("behavior", {})),
        optim=OptimConfig(**config.get("optim", {})),
        multitask=MultitaskConfig(**config.get("multitask", {})),  # absent before multi-task: the defaults
    )

"""World model: encoder, RSSM, decoder, reward and continue heads, and its loss."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lit_dreamer.agent_config import ModelConfig
from lit_dreamer.conditioning import Conditioning, ConditionedHead, with_vector
from lit_dreamer.distributions import MSE, Bernoulli, OneHotGroups, SymlogMSE, Tokens, TwoHot, kl_divergence
from lit_dreamer.losses import kl_losses
from lit_dreamer.minilm import MINILM_DIM, SentenceTable, require_minilm
from lit_dreamer.nets import (MLP, GridDecoder, GridEncoder, ImageDecoder, ImageEncoder, SentenceEncoder, TextDecoder,
                              TextEncoder, VectorEncoder, grid_side, linear)
from lit_dreamer.rssm import RSSM, State
from lit_dreamer.steps import NON_OBS_KEYS, SpecLike, is_model_input

__all__ = ["NON_OBS_KEYS", "WorldModel", "split_obs_keys"]  # NON_OBS_KEYS: its home is lit_dreamer.steps


def split_obs_keys(obs_spec: SpecLike, cnn_keys: str = ".*",
                   mlp_keys: str = ".*") -> tuple[list[str], list[str], list[str]]:
    """Pick image keys (uint8 rank 3) for the CNN, vector keys (rank-1 float) for the MLP and text keys (rank-1
    integer: token ids, lit_dreamer.envs.text) for the text encoder.

    Keys are chosen by rank and dtype, then filtered by the two regexes (text keys by mlp_keys). Anything else is
    an error that names the key, because silently ignoring an observation hides bugs.
    """
    images, vectors, texts = [], [], []
    for key, (shape, dtype) in obs_spec.items():
        if not is_model_input(key):
            continue
        if len(shape) == 3 and np.dtype(dtype) == np.uint8 and shape[-1] in (1, 3, 4):
            if re.fullmatch(cnn_keys, key):
                images.append(key)
        elif len(shape) == 1 and np.issubdtype(np.dtype(dtype), np.floating):
            if re.fullmatch(mlp_keys, key):
                vectors.append(key)
        elif len(shape) == 1 and np.issubdtype(np.dtype(dtype), np.integer):
            if re.fullmatch(mlp_keys, key):
                texts.append(key)
        else:
            raise ValueError(
                f"observation {key!r} with shape {tuple(shape)} and dtype {np.dtype(dtype)} cannot be encoded: "
                "the encoders take uint8 images HxWxC (C in 1, 3, 4), rank-1 float vectors and rank-1 integer "
                "token ids (text); "
                "reshape or wrap the environment's observation")
    if not images and not vectors and not texts:
        raise ValueError(f"no observation key matches model.cnn_keys={cnn_keys!r} or model.mlp_keys={mlp_keys!r} "
                         f"among {sorted(k for k in obs_spec if k not in NON_OBS_KEYS)}")
    return images, vectors, texts


class WorldModel(nn.Module):
    """Encoder, RSSM, decoder, reward and continue heads: what the agent learns of its environment.

    Holds an image encoder/decoder for the uint8 HxWxC keys, an MLP encoder/decoder for the vector keys and a
    token encoder/decoder per text key (`split_obs_keys`), the `rssm`, and two heads. `encode` maps observations (B, T, ...) to an embedding
    (B, T, E); `decode` maps features (B, T, F) to one distribution per decoded key; `reward` and `cont` map
    features (..., F) to a two-hot reward and a Bernoulli continue; `loss(batch)` returns (losses (B, T) by
    name, posterior State (B, T), scalar metrics). Shapes: B batch, T time, E embedding, F = rssm.feat_dim.

    Vector keys are predicted in symlog space (squared error), except, with model.one_hot_decoder=categorical,
    the keys that `one_hot` declares one-hot groups ({key: widths}, from the env): one softmax per group.
    With model.grid_encoder=conv the vector keys whose groups form a square grid of cells (`grid_keys`) have a
    convolutional encoder and decoder of their own (GridEncoder, GridDecoder); the other vector keys
    (`flat_keys`) share the vector MLPs.

    Only the reward and continue heads depend on the task (`cond`, lit_dreamer.conditioning): they take the
    task of each input beside its features. Encoder, RSSM and decoder are shared by all tasks and see none.
    With `model.text_condition` the text encoders' output is also the conditioning vector (`condition_vector`):
    `self.cond` is `cond` with its `vector_dim`, and the heads read the features with it appended.
    """

    def __init__(self, obs_spec: SpecLike, action_dim: int, cfg: ModelConfig,
                 free_nats: float = 1.0, cond: Conditioning = Conditioning(),
                 text_words: Mapping[str, Sequence[str]] | None = None,
                 one_hot: Mapping[str, Sequence[int]] | None = None):
        super().__init__()
        cfg = cfg.resolved()
        self.image_keys, self.vector_keys, self.text_keys = split_obs_keys(obs_spec, cfg.cnn_keys, cfg.mlp_keys)
        self.image_channels = [obs_spec[k][0][-1] for k in self.image_keys]
        self.vector_dims = [obs_spec[k][0][0] for k in self.vector_keys]
        self.one_hot = self.categorical_keys(one_hot or {}) if cfg.one_hot_decoder == "categorical" else {}
        self.grids = self.grid_layouts(one_hot or {}) if cfg.grid_encoder == "conv" else {}
        self.flat_keys = [k for k in self.vector_keys if k not in self.grids]
        self.flat_dims = [d for k, d in zip(self.vector_keys, self.vector_dims) if k not in self.grids]
        embed_dim = 0
        cnn = dict(mults=tuple(cfg.cnn_mults), kernel=cfg.cnn_kernel, strided=cfg.cnn_strided)
        if self.image_keys:
            sizes = {tuple(obs_spec[k][0][:2]) for k in self.image_keys}
            if len(sizes) != 1 or len(set(next(iter(sizes)))) != 1:
                raise ValueError(f"image keys {self.image_keys} must share one square size, got {sorted(sizes)}")
            size = next(iter(sizes))[0]
            self.image_encoder = ImageEncoder(sum(self.image_channels), size, cfg.depth, **cnn)
            embed_dim += self.image_encoder.out_dim
        if self.flat_keys:
            self.vector_encoder = VectorEncoder(sum(self.flat_dims), cfg.units, cfg.encoder_layers, cfg.dense_bias)
            embed_dim += self.vector_encoder.out_dim
        # In grid_keys order, as the text encoders (keys may hold '/').
        self.grid_encoders = nn.ModuleList(GridEncoder(*self.grids[k], cfg.units) for k in self.grid_keys)
        embed_dim += sum(encoder.out_dim for encoder in self.grid_encoders)
        # One encoder and decoder per text key, in text_keys order (keys may hold '/', which ModuleDict refuses).
        self.text_encoder = cfg.text_encoder
        self.text_encoders = nn.ModuleList(self.make_text_encoder(key, cfg, text_words) for key in self.text_keys)
        embed_dim += sum(encoder.out_dim for encoder in self.text_encoders)
        if cfg.text_condition and not self.text_keys:
            raise ValueError("model.text_condition needs a text observation key (token ids), and this env has none "
                             f"among {self.image_keys + self.vector_keys}; set model.text_condition=false")
        self.text_condition = cfg.text_condition
        self.cond = replace(cond, vector_dim=sum(e.out_dim for e in self.text_encoders) if cfg.text_condition else 0)
        self.rssm = RSSM(embed_dim, action_dim, deter=cfg.deter, hidden=cfg.hidden, stoch=cfg.stoch,
                         classes=cfg.classes, blocks=cfg.blocks, prior_layers=cfg.prior_layers,
                         post_layers=cfg.post_layers, unimix=cfg.unimix, bias=cfg.dense_bias)
        feat = self.rssm.feat_dim
        if self.image_keys:
            self.image_decoder = ImageDecoder(feat, sum(self.image_channels), size, cfg.depth, **cnn,
                                              projection_norm=cfg.decoder_projection_norm, bias=cfg.dense_bias)
        if self.flat_keys:
            self.vector_decoder = nn.Sequential(MLP(feat, cfg.units, cfg.encoder_layers, cfg.dense_bias),
                                                linear(cfg.units, sum(self.flat_dims)))
        self.grid_decoders = nn.ModuleList(GridDecoder(feat, *self.grids[k], cfg.units, cfg.dense_bias)
                                           for k in self.grid_keys)
        if cfg.text_encoder == "minilm":  # predicts the text's fixed sentence embedding
            self.text_decoders = nn.ModuleList(
                nn.Sequential(MLP(feat, cfg.units, cfg.encoder_layers, cfg.dense_bias), linear(cfg.units, MINILM_DIM))
                for _ in self.text_keys)
        else:  # predicts the tokens themselves
            self.text_decoders = nn.ModuleList(
                TextDecoder(feat, obs_spec[key][0][0], cfg.text_vocab, cfg.units, cfg.encoder_layers, cfg.dense_bias)
                for key in self.text_keys)
        self.reward_head = ConditionedHead(feat, cfg.bins, cfg.units, cfg.reward_layers, out_scale=0.0,
                                           bias=cfg.dense_bias, cond=self.cond)
        self.cont_head = ConditionedHead(feat, 1, cfg.units, cfg.cont_layers, bias=cfg.dense_bias, cond=self.cond)
        self.free_nats = free_nats

    def categorical_keys(self, one_hot: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
        """{vector key: group widths} of the declared one-hot keys that the vector decoder predicts, each checked
        against the key's width."""
        groups = {}
        for key, dim in zip(self.vector_keys, self.vector_dims):
            if key in one_hot:
                widths = tuple(int(w) for w in one_hot[key])
                if sum(widths) != dim or min(widths, default=0) < 1:
                    raise ValueError(f"observation {key!r} is declared one-hot with groups {list(widths)}, which do "
                                     f"not add up to its width {dim}; fix the env's metadata entry for it")
                groups[key] = widths
        return groups

    def grid_layouts(self, one_hot: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, int]]:
        """model.grid_encoder=conv: {vector key: (side, cell)} of the declared one-hot keys that form a square
        grid of cells; an error when none does (the option would change nothing)."""
        grids = {}
        for key in self.vector_keys:
            if key in one_hot and (layout := grid_side(tuple(int(w) for w in one_hot[key]))) is not None:
                grids[key] = layout
        if not grids:
            raise ValueError("model.grid_encoder=conv needs an observation the env declares a square grid of one-hot "
                             f"cells (as MiniGrid's view), and none of {self.vector_keys or 'its keys'} is one; "
                             "set model.grid_encoder=mlp")
        return grids

    @property
    def grid_keys(self) -> list[str]:
        return list(self.grids)

    @staticmethod
    def make_text_encoder(key: str, cfg: ModelConfig, text_words: Mapping[str, Sequence[str]] | None) -> nn.Module:
        """The encoder of text key `key`: learned word embeddings (tokens) or the frozen sentence encoder (minilm),
        which reads the words of the ids from `text_words` (the run's vocabulary, {key: words in id order})."""
        if cfg.text_encoder != "minilm":
            return TextEncoder(cfg.text_vocab, cfg.text_embed, cfg.units, cfg.encoder_layers, cfg.dense_bias)
        require_minilm()
        if text_words is None or key not in text_words:
            raise ValueError(f"model.text_encoder=minilm reads the words of the text observation {key!r}, but no "
                             "vocabulary was given for it (text_words); build the model with the run's vocabulary")
        return SentenceEncoder(SentenceTable(text_words[key]), cfg.units, cfg.encoder_layers, cfg.dense_bias)

    def freeze_shared(self) -> None:
        """Stop training the parts all tasks share (encoders, RSSM, decoders); the reward and continue heads,
        which depend on the task, stay trainable (`init.freeze`: adapting to a new task on a pretrained model)."""
        for name, param in self.named_parameters():
            if not name.startswith(("reward_head.", "cont_head.")):
                param.requires_grad_(False)

    @property
    def decoded_keys(self) -> list[str]:
        return self.image_keys + self.vector_keys + self.text_keys

    def encode(self, obs: dict[str, Tensor]) -> Tensor:
        """obs values (B, T, ...) -> embed (B, T, E)."""
        return self.encode_with_vector(obs)[0]

    def encode_with_vector(self, obs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """obs values (B, T, ...) -> embed (B, T, E) and the conditioning vector (B, T, D), or None without
        model.text_condition: the text encoders' part of the embedding, computed once for both."""
        parts = []
        if self.image_keys:
            image = torch.cat([obs[k] for k in self.image_keys], -1)
            parts.append(self.image_encoder(image.flatten(0, 1)).unflatten(0, image.shape[:2]))
        if self.flat_keys:
            parts.append(self.vector_encoder(torch.cat([obs[k].float() for k in self.flat_keys], -1)))
        parts += [encoder(obs[key]) for key, encoder in zip(self.grid_keys, self.grid_encoders)]
        texts = self.encode_texts(obs)
        embed = torch.cat(parts + texts, -1)
        return embed, torch.cat(texts, -1) if self.text_condition else None

    def condition_vector(self, obs: dict[str, Tensor]) -> Tensor | None:
        """The conditioning vector (B, T, D) of observations (B, T, ...): the text encoders' output with
        model.text_condition, else None."""
        return torch.cat(self.encode_texts(obs), -1) if self.text_condition else None

    def encode_texts(self, obs: dict[str, Tensor]) -> list[Tensor]:
        """Each text key's encoding (B, T, units), in text_keys order."""
        return [encoder(obs[key]) for key, encoder in zip(self.text_keys, self.text_encoders)]

    def decode(self, feat: Tensor) -> dict[str, MSE | SymlogMSE | OneHotGroups | Tokens]:
        """feat (B, T, F) -> one output distribution per decoded key."""
        outs = {}
        if self.image_keys:
            image = self.image_decoder(feat.flatten(0, 1)).unflatten(0, feat.shape[:2])
            for key, part in zip(self.image_keys, image.split(self.image_channels, -1)):
                outs[key] = MSE(part, event_dims=3)
        vectors = {}
        if self.flat_keys:
            vectors.update(zip(self.flat_keys, self.vector_decoder(feat).split(self.flat_dims, -1)))
        vectors.update((key, decoder(feat)) for key, decoder in zip(self.grid_keys, self.grid_decoders))
        for key in self.vector_keys:
            if key in self.one_hot:  # model.one_hot_decoder=categorical: a softmax per one-hot group
                outs[key] = OneHotGroups(vectors[key], self.one_hot[key])
            else:
                outs[key] = SymlogMSE(vectors[key], event_dims=1)
        for key, decoder in zip(self.text_keys, self.text_decoders):
            if self.text_encoder == "minilm":
                outs[key] = MSE(decoder(feat), event_dims=1)  # (B, T, 384): the text's sentence embedding
            else:
                outs[key] = Tokens(decoder(feat))  # (B, T, L, V) logits of the token ids (B, T, L)
        return outs

    def target(self, key: str, batch: dict[str, Tensor]) -> Tensor:
        """What the decoder of `key` predicts for a batch: images in [0, 1], vectors and token ids as stored, and
        with model.text_encoder=minilm a text's fixed sentence embedding (B, T, 384)."""
        if key in self.image_keys:
            return batch[key].float() / 255.0
        if key in self.text_keys and self.text_encoder == "minilm":
            return self.text_encoders[self.text_keys.index(key)].table(batch[key])
        return batch[key]

    def reward(self, feat: Tensor, task: Tensor | None = None) -> TwoHot:
        """feat (..., F + D), task (...) int64 (needed with several tasks) -> the predicted reward.

        feat holds the conditioning vector, appended (`with_vector`), when there is one (D = cond.vector_dim)."""
        return TwoHot(self.reward_head(feat, task))

    def cont(self, feat: Tensor, task: Tensor | None = None) -> Bernoulli:
        """feat (..., F + D), task (...) int64 (needed with several tasks) -> the predicted continue."""
        return Bernoulli(self.cont_head(feat, task).squeeze(-1))

    def loss(self, batch: dict[str, Tensor], start: State | None = None, task: Tensor | None = None
             ) -> tuple[dict[str, Tensor], State, dict[str, Tensor]]:
        """World-model losses of a replayed batch (which holds no task: see `task`).

        task (B, T) int64 goes to the reward and continue heads only, never to the encoder, RSSM or decoder.
        Returns losses as (B, T) tensors keyed `rec/<obs key>`, `rew`, `con`, `dyn`, `rep`; the
        posterior states (B, T) with gradients attached; and scalar metrics.
        """
        embed, vector = self.encode_with_vector(batch)
        post, prior_logits = self.rssm.observe(embed, batch["action"], batch["is_first"], start)
        feat = post.feat()
        losses = {}
        for key, dist in self.decode(feat).items():  # the decoder reads the latent alone, never the vector
            losses[f"rec/{key}"] = dist.loss(self.target(key, batch))
        head_feat = with_vector(feat, vector)
        losses["rew"] = self.reward(head_feat, task).loss(batch["reward"])
        losses["con"] = self.cont(head_feat, task).loss(1.0 - batch["is_terminal"].float())
        losses["dyn"], losses["rep"] = kl_losses(post.logits, prior_logits, free_nats=self.free_nats,
                                                 unimix=self.rssm.unimix)
        with torch.no_grad():
            post_dist, prior_dist = self.rssm.dist(post.logits), self.rssm.dist(prior_logits)
            metrics = {
                "wm/post_entropy": post_dist.entropy().mean(),
                "wm/prior_entropy": prior_dist.entropy().mean(),
                "wm/kl": kl_divergence(post_dist, prior_dist).mean(),
            }
        return losses, post, metrics

"""Text observations (issue 23): word-level vocabulary, the token wrapper, the token encoder and decoder, the
vocabulary in checkpoints, and a tiny CLI fit on an env with a gymnasium Text key (tests/text_envs.py)."""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from lit_dreamer.agent_config import AgentConfig, LossScales, ModelConfig
from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.distributions import Tokens
from lit_dreamer.envs import make_env, make_vector_env
from lit_dreamer.envs.text import (OOV, PAD, TextVocabularies, Vocabulary, check_text_growth, is_text_space,
                                   text_keys, tokenize)
from lit_dreamer.module import DreamerModule
from lit_dreamer.world_model import WorldModel
from tests.text_envs import DECLARED_TEXT_ENV, INSTRUCTIONS, TEXT_ENV, WORDS

L, V = 8, 16
TINY = ModelConfig(deter=32, hidden=8, classes=4, stoch=4, depth=2, units=16, blocks=4, text_vocab=V, text_embed=8)
SPEC = {"vector": ((2,), np.float32), "mission": ((L,), np.int64)}


# --------------------------------------------------------------------------------------------------
# Vocabulary


def test_tokenizer_round_trip_and_out_of_vocabulary():
    assert tokenize("Go to the RED ball, then pick-up 2 keys!") == ["go", "to", "the", "red", "ball", "then", "pick",
                                                                  "up", "2", "keys"]
    vocabulary = Vocabulary(["go", "to", "the", "red", "blue", "ball"], size=V, grow=False)
    ids = vocabulary.encode("Go to the red ball", L)
    assert ids.dtype == np.int64 and ids.shape == (L,)
    assert ids.tolist() == [2, 3, 4, 5, 7, PAD, PAD, PAD]
    assert vocabulary.decode(ids) == "go to the red ball"
    # A word outside a declared vocabulary is out-of-vocabulary, and the vocabulary does not grow.
    assert vocabulary.encode("go to the green ball", L).tolist()[:5] == [2, 3, 4, OOV, 7]
    assert "green" not in vocabulary.ids and vocabulary.decode([2, OOV]) == "go <unk>"


def test_texts_longer_than_the_length_are_cut_with_one_warning():
    vocabulary = Vocabulary(size=V, key="mission")
    with pytest.warns(UserWarning, match="'mission' has 5 words, more than env.text_length=3"):
        ids = vocabulary.encode("a b c d e", 3)
    assert vocabulary.decode(ids) == "a b c"
    assert vocabulary.words == ["a", "b", "c"]  # the cut words never enter the vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per key: the second long text is cut silently
        assert vocabulary.encode("a b c d e f", 3).tolist() == [2, 3, 4]


def test_a_growing_vocabulary_adds_words_in_order_until_full_then_maps_to_out_of_vocabulary():
    vocabulary = Vocabulary(size=5)  # padding, out-of-vocabulary and three words
    assert vocabulary.encode("one two one", 4).tolist() == [2, 3, 2, PAD]
    assert vocabulary.encode("three four five", 4).tolist() == [4, OOV, OOV, PAD]
    assert vocabulary.words == ["one", "two", "three"] and len(vocabulary) == 5
    assert vocabulary.encode("two four", 4).tolist() == [3, OOV, PAD, PAD]


def test_a_declared_vocabulary_larger_than_text_vocab_is_a_config_error():
    with pytest.raises(ConfigError, match="set model.text_vocab to at least 5"):
        Vocabulary(["a", "b", "c"], size=4, grow=False)


# --------------------------------------------------------------------------------------------------
# The wrapper and the envs


class StringSpace(spaces.Space[str]):
    """A space whose samples are str but is no gymnasium Text (as minigrid's MissionSpace)."""

    def sample(self, mask=None, probability=None) -> str:
        return "go left"

    def contains(self, x) -> bool:
        return isinstance(x, str)


def test_text_spaces_are_recognised_by_their_samples():
    assert is_text_space(spaces.Text(10)) and is_text_space(StringSpace())
    assert not is_text_space(spaces.Box(0, 1, (3,))) and not is_text_space(spaces.Discrete(3))
    observation = spaces.Dict({"mission": StringSpace(), "vector": spaces.Box(0, 1, (2,))})
    assert text_keys(observation) == ["mission"]


def test_the_wrapper_turns_text_into_int64_token_boxes_and_keeps_the_other_keys():
    vocabularies = TextVocabularies(size=32)
    env = make_env(TEXT_ENV, seed=0, text_length=6, vocabularies=vocabularies)
    space = env.observation_space
    assert space["mission"] == spaces.Box(0, 31, (6,), np.int64)  # DictObservation left it int64
    assert space["vector"].dtype == np.float32
    observation, _ = env.reset(seed=3)
    assert observation["mission"].dtype == np.int64 and observation["mission"] in space["mission"]
    text = INSTRUCTIONS[env.unwrapped.target]
    assert vocabularies.vocabularies["mission"].decode(observation["mission"]) == text


def test_a_declared_vocabulary_fixes_the_ids_and_does_not_grow():
    vocabularies = TextVocabularies(size=32)
    env = make_env(DECLARED_TEXT_ENV, seed=0, vocabularies=vocabularies)
    for seed in range(6):
        observation, _ = env.reset(seed=seed)
        expected = [WORDS.index(word) + 2 for word in INSTRUCTIONS[env.unwrapped.target].split()]
        assert observation["mission"][:2].tolist() == expected
    assert vocabularies.growing() == [] and vocabularies.state() == {"mission": WORDS}


def test_the_envs_of_a_sync_vector_env_share_one_growing_vocabulary():
    envs = make_vector_env(TEXT_ENV, 4, seed=0)
    seen: dict[int, set] = {0: set(), 1: set()}
    observation, _ = envs.reset(seed=0)
    for _ in range(12):  # episodes of 5 steps: new instructions at each reset, in every env
        for index, env in enumerate(envs.envs):
            seen[env.unwrapped.target].add(tuple(observation["mission"][index].tolist()))
        observation, *_ = envs.step(np.zeros(4, np.int64))
    envs.close()
    # Each instruction has one id sequence in every env, and the two differ.
    assert len(seen[0]) == 1 and len(seen[1]) == 1 and seen[0] != seen[1]


def test_a_growing_vocabulary_is_refused_where_envs_cannot_share_it(tmp_path):
    vocabularies = TextVocabularies()
    make_env(TEXT_ENV, vocabularies=vocabularies)
    check_text_growth(vocabularies, asynchronous=False, world_size=1)
    with pytest.raises(ConfigError, match="env.asynchronous=true.*declare the words in the env"):
        check_text_growth(vocabularies, asynchronous=True, world_size=1)
    with pytest.raises(ConfigError, match="2 devices"):
        check_text_growth(vocabularies, asynchronous=False, world_size=2)
    declared = TextVocabularies()
    make_env(DECLARED_TEXT_ENV, vocabularies=declared)
    check_text_growth(declared, asynchronous=True, world_size=2)  # fixed ids: nothing to share
    # Through the run's build: fails before any subprocess env is made.
    from lit_dreamer.train import build
    cfg = load_config(["debug"], [f"env.id={TEXT_ENV}", "env.asynchronous=true", f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="no declared vocabulary"):
        build(cfg)


def test_saved_words_restore_the_ids_and_must_match_a_declaration():
    restored = TextVocabularies(saved={"mission": ["go", "right", "left"]})
    env = make_env(TEXT_ENV, vocabularies=restored)
    observation, _ = env.reset(seed=0)
    expected = [["go", "right", "left"].index(w) + 2 for w in INSTRUCTIONS[env.unwrapped.target].split()]
    assert observation["mission"][:2].tolist() == expected
    with pytest.raises(ConfigError, match="checkpoint's vocabulary of the text observation 'mission'.*differs"):
        make_env(DECLARED_TEXT_ENV, vocabularies=TextVocabularies(saved={"mission": ["go", "right", "left"]}))


# --------------------------------------------------------------------------------------------------
# The model


def text_batch(B: int = 2, T: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mission = torch.zeros(B, T, L, dtype=torch.long)
    mission[..., :4] = torch.randint(1, V, (B, T, 4), generator=g)
    is_first = torch.zeros(B, T, dtype=torch.bool)
    is_first[:, 0] = True
    return {"vector": torch.randn(B, T, 2, generator=g), "mission": mission,
            "action": torch.nn.functional.one_hot(torch.randint(0, 2, (B, T), generator=g), 2).float(),
            "reward": torch.randn(B, T, generator=g), "is_first": is_first,
            "is_last": torch.zeros(B, T, dtype=torch.bool), "is_terminal": torch.zeros(B, T, dtype=torch.bool)}


def test_text_keys_are_encoded_and_decoded_as_tokens_and_the_loss_reaches_the_encoder():
    torch.manual_seed(0)
    wm = WorldModel(SPEC, 2, TINY)
    assert wm.text_keys == ["mission"] and wm.vector_keys == ["vector"]
    batch = text_batch()
    losses, post, _ = wm.loss(batch)
    assert losses["rec/mission"].shape == (2, 3)
    decoded = wm.decode(post.feat())["mission"]
    assert isinstance(decoded, Tokens) and decoded.logits.shape == (2, 3, L, V)
    assert decoded.mode().shape == (2, 3, L)
    losses["rec/mission"].mean().backward()
    grad = wm.text_encoders[0].embedding.weight.grad
    # Through the posterior latent: the words in the batch get a gradient, the padding row never does.
    used = batch["mission"].unique()
    assert grad[used[used != PAD]].abs().sum(-1).gt(0).all()
    assert grad[PAD].abs().sum() == 0


def test_token_loss_is_the_cross_entropy_summed_over_positions_padding_included():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # (1, L=2, V=3)
    target = torch.tensor([[0, 1]])
    expected = -(torch.log_softmax(logits[0, 0], -1)[0] + torch.log_softmax(logits[0, 1], -1)[1])
    torch.testing.assert_close(Tokens(logits).loss(target), expected[None])


def test_texts_that_differ_only_in_the_instruction_embed_differently():
    torch.manual_seed(0)
    wm = WorldModel(SPEC, 2, TINY)
    vocabulary = Vocabulary(size=V)
    red, blue = (torch.as_tensor(vocabulary.encode(f"go to the {c} ball", L)) for c in ("red", "blue"))
    vector = torch.zeros(1, 1, 2)
    embed_red = wm.encode({"vector": vector, "mission": red[None, None]})
    embed_blue = wm.encode({"vector": vector, "mission": blue[None, None]})
    assert not torch.allclose(embed_red, embed_blue)
    # ... and padding does not change a text's embedding (the mean reads words only).
    longer = torch.as_tensor(vocabulary.encode("go to the red ball", 2 * L))
    spec = {**SPEC, "mission": ((2 * L,), np.int64)}
    torch.manual_seed(0)
    wm_longer = WorldModel(spec, 2, TINY)
    torch.testing.assert_close(wm_longer.encode({"vector": vector, "mission": longer[None, None]}), embed_red)


def test_the_text_loss_scale_weighs_its_rec_term_only():
    def weighted_terms(text_scale: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = DreamerModule(SPEC, 2, True, AgentConfig(model=TINY, loss_scales=LossScales(text=text_scale)))
        torch.manual_seed(1)
        losses, _, _ = module.world_model.loss(text_batch())
        assert module.scales["rec/mission"] == text_scale and module.scales["rec/vector"] == 1.0
        assert "text" not in module.scales  # a weight, not a loss term
        return {k: module.scales[k] * v.mean() for k, v in losses.items()}

    once, twice = weighted_terms(1.0), weighted_terms(2.0)
    torch.testing.assert_close(twice["rec/mission"], 2 * once["rec/mission"])
    for key in once.keys() - {"rec/mission"}:
        torch.testing.assert_close(twice[key], once[key])


def test_models_without_text_keep_their_parameters_and_old_configs_load():
    plain = WorldModel({"vector": ((5,), np.float32)}, 1, TINY)
    assert not [name for name in plain.state_dict() if "text" in name]
    saved = {k: v for k, v in asdict(ModelConfig()).items() if not k.startswith("text_")}
    restored = ModelConfig.from_saved(saved)
    assert (restored.text_encoder, restored.text_vocab, restored.text_embed) == ("tokens", 256, 32)


def test_the_text_settings_are_validated():
    with pytest.raises(ConfigError, match="unknown model.text_encoder 'bert'; choose one of tokens, minilm"):
        load_config([], ["model.text_encoder=bert"])
    with pytest.raises(ConfigError, match="model.text_vocab must be at least 3"):
        load_config([], ["model.text_vocab=2"])
    with pytest.raises(ConfigError, match="env.text_length must be positive"):
        load_config([], ["env.text_length=0"])


def test_the_model_config_default_and_the_env_default_agree():
    from lit_dreamer.config import EnvConfig
    from lit_dreamer.envs.text import DEFAULT_TEXT_LENGTH, DEFAULT_TEXT_VOCAB
    assert EnvConfig().text_length == DEFAULT_TEXT_LENGTH and ModelConfig().text_vocab == DEFAULT_TEXT_VOCAB
    assert replace(ModelConfig(), text_vocab=8).text_vocab == 8

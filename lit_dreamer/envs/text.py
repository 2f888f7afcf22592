"""Text observations as token ids: a word-level vocabulary and the wrapper that applies it.

An observation entry whose space holds strings (gymnasium ``Text``, or minigrid's ``MissionSpace``: any
space whose samples are ``str``) becomes ``Box(0, V - 1, (L,), int64)``: the ids of its first L words,
padded with 0. Id 0 is padding, id 1 an out-of-vocabulary word, words start at 2.

Where the words come from, in this order:

- the env declares them: ``env.metadata["lit_dreamer_text_vocabulary"] = {key: [words]}`` (fixed ids);
- otherwise the vocabulary grows: each new word gets the next id in order of first appearance, until V
  entries; later new words map to the out-of-vocabulary id.

Growth gives the same ids to every env of a run only when they share one ``Vocabulary`` object: the envs of
a synchronous vector env do (``make_vector_env`` passes one ``TextVocabularies`` to all of them); envs in
subprocesses or on other devices cannot, and ``check_text_growth`` refuses them. A run's vocabulary is saved
in its checkpoints (lit_dreamer.resume.RunRecord) and restored from them, so ids never shift.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Iterable, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from lit_dreamer.config import ConfigError
from lit_dreamer.relabel import text_label_key

VOCABULARY_METADATA_KEY = "lit_dreamer_text_vocabulary"
"""env.metadata entry where an env declares its words: {observation key: [word, ...]}."""
PAD, OOV = 0, 1
FIRST_WORD = 2
DEFAULT_TEXT_LENGTH = 24
"""Tokens kept per text. Longest BabyAI missions over 200 seeds: GoToLocal 5 words, PickupLoc 9, SynthLoc 14,
GoToSeq 24, BossLevel 33 (cut, with a warning)."""
DEFAULT_TEXT_VOCAB = 256
"""Vocabulary entries including padding and out-of-vocabulary: BabyAI's mission grammar has about 40 words."""
_WORDS = re.compile(r"[^\W_]+")  # runs of letters or digits (any script); everything else separates words


def tokenize(text: str) -> list[str]:
    """Lowercase words: 'Go to the red ball, then...' -> ['go', 'to', 'the', 'red', 'ball', 'then']."""
    return _WORDS.findall(text.lower())


class Vocabulary:
    """Words <-> ids with 0 = padding and 1 = out-of-vocabulary; `size` counts both.

    With `grow` an unknown word gets the next free id while fewer than `size` entries exist; without it (a
    declared vocabulary) every unknown word is out-of-vocabulary.
    """

    def __init__(self, words: Iterable[str] = (), size: int = DEFAULT_TEXT_VOCAB, grow: bool = True,
                 key: str = "text"):
        self.size, self.grow, self.key = size, grow, key
        self.words: list[str] = []
        self.ids: dict[str, int] = {}
        for word in words:
            self.add(word)
        if len(self.words) + FIRST_WORD > size:
            raise ConfigError(f"the vocabulary of {key!r} has {len(self.words)} words, more than model.text_vocab="
                              f"{size} holds with padding and out-of-vocabulary; set model.text_vocab to at least "
                              f"{len(self.words) + FIRST_WORD}")
        self.warned_truncation = False

    def __len__(self) -> int:
        """Entries in use, padding and out-of-vocabulary included."""
        return len(self.words) + FIRST_WORD

    def add(self, word: str) -> int:
        if word not in self.ids:
            self.ids[word] = len(self.words) + FIRST_WORD
            self.words.append(word)
        return self.ids[word]

    def id(self, word: str) -> int:
        """The word's id; a new word grows the vocabulary while it may, else is out-of-vocabulary."""
        if word in self.ids:
            return self.ids[word]
        if self.grow and len(self) < self.size:
            return self.add(word)
        return OOV

    def encode(self, text: str, length: int) -> np.ndarray:
        """(length,) int64 ids of the text's first `length` words, padded with 0 (warns once if it cuts)."""
        words = tokenize(text)
        if len(words) > length and not self.warned_truncation:
            self.warned_truncation = True
            warnings.warn(f"text observation {self.key!r} has {len(words)} words, more than env.text_length="
                          f"{length}: texts are cut to their first {length} words (raise env.text_length to "
                          "keep them whole)", stacklevel=2)
        ids = np.zeros(length, np.int64)
        ids[:min(len(words), length)] = [self.id(word) for word in words[:length]]
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The words of the ids, padding left out, out-of-vocabulary ids as <unk>."""
        words = []
        for index in np.asarray(ids).tolist():
            if index >= FIRST_WORD and index - FIRST_WORD < len(self.words):
                words.append(self.words[index - FIRST_WORD])
            elif index != PAD:
                words.append("<unk>")
        return " ".join(words)


class TextVocabularies:
    """The run's vocabulary of each text key, shared by every env that is given this object.

    `saved` ({key: [words]}, from a checkpoint) starts each key where the run left off; a key an env declares
    must then match the saved words exactly, or the ids a model learned would change meaning.
    """

    def __init__(self, size: int = DEFAULT_TEXT_VOCAB, saved: dict[str, list[str]] | None = None):
        self.size = size
        self.saved = {key: list(words) for key, words in (saved or {}).items()}
        self.vocabularies: dict[str, Vocabulary] = {}

    def for_key(self, key: str, declared: Sequence[str] | None) -> Vocabulary:
        """The vocabulary of `key`: the one already made, else from the declaration or the saved words."""
        if key in self.vocabularies:
            vocabulary = self.vocabularies[key]
            if declared is not None and vocabulary.words != list(declared):
                raise ConfigError(f"two envs of this run declare different vocabularies for the text observation "
                                  f"{key!r}; tasks trained together need one vocabulary per key")
            return vocabulary
        saved = self.saved.get(key)
        if declared is not None and saved is not None and list(declared) != saved:
            raise ConfigError(f"the checkpoint's vocabulary of the text observation {key!r} ({len(saved)} words) "
                              f"differs from the one the env declares ({len(declared)} words): its token ids would "
                              "mean other words; use the env version the checkpoint was trained with, or start a new "
                              "run")
        words = declared if declared is not None else (saved or ())
        vocabulary = Vocabulary(words, self.size, grow=declared is None, key=key)
        self.vocabularies[key] = vocabulary
        return vocabulary

    def growing(self) -> list[str]:
        """Keys whose vocabulary grows (no declaration)."""
        return [key for key, vocabulary in self.vocabularies.items() if vocabulary.grow]

    def words(self) -> dict[str, list[str]]:
        """{key: words in id order} of every key, live: a growing vocabulary's list is the one that grows (what
        model.text_encoder=minilm reads the ids with); saved keys no env has asked for yet, as saved."""
        return {**self.saved, **{key: vocabulary.words for key, vocabulary in self.vocabularies.items()}}

    def state(self) -> dict[str, list[str]]:
        """{key: words in id order} of every key: what a checkpoint saves (and saved keys not seen since)."""
        return {**self.saved, **{key: list(vocabulary.words) for key, vocabulary in self.vocabularies.items()}}


def check_text_growth(vocabularies: TextVocabularies | None, asynchronous: bool, world_size: int) -> None:
    """Refuse a growing vocabulary where envs cannot share it: subprocess envs or several devices would each
    grow their own and give one word different ids."""
    growing = vocabularies.growing() if vocabularies is not None else []
    if not growing or (not asynchronous and world_size == 1):
        return
    where = "env.asynchronous=true" if asynchronous else f"{world_size} devices"
    raise ConfigError(f"the text observations {growing} have no declared vocabulary, and a vocabulary grown with "
                      f"{where} would give one word different ids in different envs; declare the words in the env "
                      f"(env.metadata[{VOCABULARY_METADATA_KEY!r}] = {{key: [words]}}), or set "
                      "env.asynchronous=false on one device")


def is_text_space(space: spaces.Space) -> bool:
    """Whether a space's samples are strings: gymnasium Text, or a custom one such as minigrid's MissionSpace."""
    if isinstance(space, spaces.Text):
        return True
    if isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary, spaces.Dict,
                          spaces.Tuple, spaces.Sequence, spaces.Graph)):
        return False
    try:
        return isinstance(space.sample(), str)
    except Exception:  # noqa: BLE001 - a space that cannot sample is not one we can read as text
        return False


def text_keys(space: spaces.Space) -> list[str]:
    """Top-level keys of a Dict observation space whose entries are text."""
    if not isinstance(space, spaces.Dict):
        return []
    return [key for key, subspace in space.spaces.items() if is_text_space(subspace)]


class TextTokens(gym.ObservationWrapper):
    """Every text entry of a Dict observation as `Box(0, V - 1, (length,), int64)` token ids.

    `keys` are the text keys (DictObservation keeps their int64 boxes as they are).
    """

    def __init__(self, env: gym.Env, vocabularies: TextVocabularies, length: int = DEFAULT_TEXT_LENGTH):
        super().__init__(env)
        if length < 1:
            raise ConfigError(f"env.text_length must be at least 1, got {length}")
        self.keys = text_keys(env.observation_space)
        declared = env.metadata.get(VOCABULARY_METADATA_KEY) or {}
        self.vocabularies = {key: vocabularies.for_key(key, declared.get(key)) for key in self.keys}
        self.length = length
        token_box = spaces.Box(0, vocabularies.size - 1, (length,), np.int64)
        self.observation_space = spaces.Dict(
            {key: token_box if key in self.keys else space for key, space in env.observation_space.spaces.items()})

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        return encode_texts(observation, self.vocabularies, self.length)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict]:
        observation, reward, terminated, truncated, info = super().step(action)
        # A hindsight label of a text key (lit_dreamer.rewards.hindsight) becomes token ids as the key does.
        labels = {label: self.vocabularies[key].encode(info[label], self.length)
                  for key in self.keys if (label := text_label_key(key)) in info}
        return observation, reward, terminated, truncated, {**info, **labels} if labels else info


def encode_texts(observation: dict[str, Any], vocabularies: dict[str, Vocabulary], length: int) -> dict[str, Any]:
    """A Dict observation with the entry of every key in `vocabularies` as (length,) int64 token ids (TextTokens'
    conversion, shared with lit_dreamer.agent); other entries unchanged."""
    return {key: vocabularies[key].encode(value, length) if key in vocabularies else value
            for key, value in observation.items()}


def wrap_text(env: gym.Env, vocabularies: TextVocabularies | None, length: int) -> tuple[gym.Env, list[str]]:
    """The env with its text entries as token ids (unchanged without text) and the text keys.

    Without `vocabularies` the env grows a vocabulary of its own (DEFAULT_TEXT_VOCAB entries)."""
    if not text_keys(env.observation_space):
        return env, []
    wrapped = TextTokens(env, vocabularies or TextVocabularies(), length)
    return wrapped, wrapped.keys

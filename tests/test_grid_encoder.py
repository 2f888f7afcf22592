"""model.grid_encoder=conv: the vector keys an env declares a square grid of one-hot cells (MiniGrid's view) are
encoded and decoded by convolutions whose weights every cell shares (lit_dreamer.nets.GridEncoder, GridDecoder)."""

import pytest
import torch

from lit_dreamer.agent_config import ModelConfig
from lit_dreamer.config import ConfigError, load_config
from lit_dreamer.distributions import OneHotGroups, SymlogMSE
from lit_dreamer.nets import GridDecoder, GridEncoder, grid_side
from lit_dreamer.world_model import WorldModel

SIDE, CELL = 5, (3, 2)  # a 5 x 5 grid of cells holding a 3-way and a 2-way choice
SPEC = {"grid": ((SIDE * SIDE * sum(CELL),), "float32"), "direction": ((4,), "float32"),
        "pos": ((2,), "float32")}
ONE_HOT = {"grid": list(CELL) * SIDE * SIDE, "direction": [4]}


def model(**overrides) -> ModelConfig:
    return ModelConfig(size="size1m", grid_encoder="conv", **overrides)


def test_grid_side_finds_the_square_of_repeated_cells_and_nothing_else():
    assert grid_side((11, 6, 3) * 49) == (7, 20)  # MiniGrid's 7 x 7 view
    assert grid_side((2, 2) * 49) == (7, 4)  # period 1 gives 98 cells, not a square: cells of two groups
    assert grid_side((3,) * 9) == (3, 3)
    assert grid_side((4,)) is None  # a Discrete key: one group
    assert grid_side((3,) * 4) is None  # a 2 x 2 "grid" is too small to convolve
    assert grid_side((2, 3) * 8 + (2, 4)) is None  # not a repeated cell


def grid_of(cells: torch.Tensor) -> torch.Tensor:
    """(N, side, side) indices of the 3-way choice -> flattened one-hot cells (N, side * side * 5), the 2-way
    choice always 0."""
    three = torch.nn.functional.one_hot(cells, 3).float()
    two = torch.nn.functional.one_hot(torch.zeros_like(cells), 2).float()
    return torch.cat([three, two], -1).flatten(1)


def test_the_grid_encoder_reads_every_cell_with_the_same_weights():
    torch.manual_seed(0)
    side = 9  # two 3x3 convolutions see 5 x 5 cells: compare cells whose 5 x 5 lie inside the grid
    encoder = GridEncoder(side, sum(CELL), channels=8)
    cells = torch.zeros(2, side, side, dtype=torch.long)
    cells[0, 3, 3] = 2  # the same object at two places, in an otherwise uniform grid
    cells[1, 4, 5] = 2
    maps = encoder(grid_of(cells)).view(2, 8, side, side)
    # A shifted input gives the shifted map: weights shared by every cell.
    torch.testing.assert_close(maps[0, :, 2:5, 2:5], maps[1, :, 3:6, 4:7])
    assert not torch.allclose(maps[0, :, 2:5, 2:5], maps[0, :, 3:6, 4:7])  # and the object is seen
    assert encoder.out_dim == 8 * side * side


def test_the_grid_decoder_writes_each_cells_outputs_where_the_encoder_reads_them():
    torch.manual_seed(0)
    decoder = GridDecoder(feat_dim=6, side=SIDE, cell=sum(CELL), channels=8)
    feat = torch.randn(3, 4, 6)
    out = decoder(feat)
    assert out.shape == (3, 4, SIDE * SIDE * sum(CELL))
    # Cell (i, j) of the last conv's map is entries (i * side + j) * cell ... + cell of the flat output.
    x = torch.nn.functional.silu(decoder.project_norm(decoder.project(feat[0, 0]).view(1, 8, SIDE, SIDE)))
    logits = decoder.out(torch.nn.functional.silu(decoder.hidden_norm(decoder.hidden(x))))[0]  # (cell, side, side)
    i, j = 2, 4
    torch.testing.assert_close(out[0, 0, (i * SIDE + j) * 5:(i * SIDE + j + 1) * 5], logits[:, i, j])


def test_the_world_model_convolves_the_grid_and_keeps_the_other_vectors_in_the_mlp():
    wm = WorldModel(SPEC, 2, model(one_hot_decoder="categorical"), one_hot=ONE_HOT)
    assert wm.grid_keys == ["grid"] and wm.flat_keys == ["direction", "pos"]
    assert set(wm.vector_keys) == {"direction", "grid", "pos"}  # every vector key is still a vector key
    assert wm.vector_encoder.mlp[0][0].in_features == 4 + 2
    outs = wm.decode(torch.zeros(2, 3, wm.rssm.feat_dim))
    assert isinstance(outs["grid"], OneHotGroups) and outs["grid"].mean().shape == (2, 3, SIDE * SIDE * 5)
    assert isinstance(outs["pos"], SymlogMSE)
    B, T = 2, 4
    cells = torch.randint(0, 3, (B * T, SIDE, SIDE))
    batch = {"grid": grid_of(cells).view(B, T, -1), "direction": torch.nn.functional.one_hot(
        torch.randint(0, 4, (B, T)), 4).float(), "pos": torch.randn(B, T, 2),
        "action": torch.nn.functional.one_hot(torch.randint(0, 2, (B, T)), 2).float(),
        "reward": torch.zeros(B, T), "is_first": torch.zeros(B, T), "is_terminal": torch.zeros(B, T)}
    batch["is_first"][:, 0] = 1
    losses, _, _ = wm.loss(batch)
    sum(loss.mean() for loss in losses.values()).backward()
    # The grid's loss reaches both convolutional networks; the MLP decodes only the other keys.
    assert wm.grid_encoders[0].convs[0].weight.grad.abs().sum() > 0
    assert wm.grid_decoders[0].out.weight.grad.abs().sum() > 0
    assert wm.vector_decoder[-1].out_features == 4 + 2


def test_the_mlp_default_builds_the_same_modules_as_before():
    wm = WorldModel(SPEC, 2, ModelConfig(size="size1m"), one_hot=ONE_HOT)
    assert wm.grid_keys == [] and wm.flat_keys == wm.vector_keys
    assert not any(name.startswith("grid_") for name in wm.state_dict())


def test_conv_without_a_grid_observation_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="model.grid_encoder=conv needs .* square grid .*set model.grid_encoder=mlp"):
        WorldModel({"pos": ((2,), "float32")}, 2, model(), one_hot={})


def test_an_unknown_grid_encoder_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="unknown model.grid_encoder 'cnn'; choose one of mlp, conv"):
        load_config([], ["model.grid_encoder=cnn"])


def test_a_tiny_babyai_fit_with_the_conv_grid_encoder_and_its_eval_through_the_cli(tmp_path, monkeypatch):
    from lit_dreamer.__main__ import main
    from lit_dreamer.evaluation import load_module
    from lit_dreamer.checkpoint_files import find_checkpoint
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    assert main(["fit", "-c", "debug", "env.id=babyai/GoToObj", "model.grid_encoder=conv",
                 f"run.dir={tmp_path}/run", "logger.backend=csv", "logger.log_checkpoints=none",
                 "run.eval_every=0"]) == 0
    module, _ = load_module(find_checkpoint(str(tmp_path / "run")))  # rebuilt from the checkpoint's config
    assert module.world_model.grid_keys == ["grid"] and module.world_model.flat_keys == ["direction"]
    assert main(["eval", "--ckpt", str(tmp_path / "run"), "episodes=1"]) == 0

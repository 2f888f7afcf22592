"""Golden-value tests of LaProp with adaptive gradient clipping (lit_dreamer.optim)."""

import copy
import io

import pytest
import torch
from torch.testing import assert_close

from lit_dreamer.optim import LaProp


def step_with(optimizer: LaProp, params: list, grads: list) -> None:
    for param, grad in zip(params, grads):
        param.grad = torch.tensor(grad, dtype=param.dtype)
    optimizer.step()


def test_two_steps_without_clipping_hand_computed():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    optimizer = LaProp([p], lr=0.1, warmup=0)
    # Step 1, g = [0.3, -0.4]. AGC: ||g|| = 0.5 <= 0.3 * ||p|| = 0.3 * 5 = 1.5, no clip.
    #   nu = 0.001 * g^2 = [9e-5, 1.6e-4];  nu_hat = nu / (1 - 0.999) = g^2 = [0.09, 0.16]
    #   u = g / sqrt(nu_hat) = [1, -1];  m = 0.1 * u = [0.1, -0.1];  m_hat = m / (1 - 0.9) = [1, -1]
    #   p = [3, 4] - 0.1 * [1, -1] = [2.9, 4.1]
    step_with(optimizer, [p], [[0.3, -0.4]])
    assert_close(p.data, torch.tensor([2.9, 4.1], dtype=torch.float64), rtol=0.0, atol=1e-12)
    assert optimizer.clipped_fraction[0].item() == 0.0
    # Step 2, g = [0.6, 0]. ||p|| = sqrt(2.9^2 + 4.1^2) = 5.02195, limit 1.50659 > 0.6, no clip.
    #   nu = 0.999 * [9e-5, 1.6e-4] + 0.001 * [0.36, 0] = [4.4991e-4, 1.5984e-4]
    #   nu_hat = nu / (1 - 0.999^2 = 0.001999) = [0.2250675, 0.0799600];  sqrt = [0.4744128, 0.2827720]
    #   u = [0.6 / 0.4744128, 0] = [1.2647213, 0]
    #   m = 0.9 * [0.1, -0.1] + 0.1 * u = [0.2164721, -0.09];  m_hat = m / (1 - 0.81) = [1.1393270, -0.4736842]
    #   p = [2.9, 4.1] - 0.1 * m_hat = [2.7860673, 4.1473684]
    step_with(optimizer, [p], [[0.6, 0.0]])
    assert_close(p.data, torch.tensor([2.7860673013, 4.1473684211], dtype=torch.float64), rtol=0.0, atol=1e-9)


def test_agc_clips_and_changes_the_second_step():
    p = torch.nn.Parameter(torch.tensor([0.6, 0.8], dtype=torch.float64))
    optimizer = LaProp([p], lr=0.01, warmup=0)
    # Step 1, g = [3, 4]: ||g|| = 5 > 0.3 * ||p|| = 0.3 * 1 = 0.3, so g is scaled by 0.3 / 5:
    #   g = [0.18, 0.24];  nu = 0.001 * g^2 = [3.24e-5, 5.76e-5] (unclipped it would be [9e-3, 1.6e-2])
    #   u = [1, 1] either way on the first step;  m = [0.1, 0.1];  p = [0.6, 0.8] - 0.01 = [0.59, 0.79]
    step_with(optimizer, [p], [[3.0, 4.0]])
    assert optimizer.clipped_fraction[0].item() == 1.0
    assert_close(optimizer.state[p]["nu"], torch.tensor([3.24e-5, 5.76e-5], dtype=torch.float64),
                 rtol=1e-12, atol=0.0)
    assert_close(p.data, torch.tensor([0.59, 0.79], dtype=torch.float64), rtol=0.0, atol=1e-12)
    # Step 2, g = [0.18, 0]: ||p|| = 0.98600, limit 0.2958 > 0.18, no clip.
    #   nu = 0.999 * [3.24e-5, 5.76e-5] + 0.001 * [0.0324, 0] = [6.47676e-5, 5.75424e-5]
    #   nu_hat = nu / 0.001999 = [0.0324, 0.0287856];  u = [0.18 / 0.18, 0] = [1, 0]
    #   m = 0.9 * [0.1, 0.1] + 0.1 * [1, 0] = [0.19, 0.09];  m_hat = m / 0.19 = [1, 0.4736842]
    #   p = [0.59, 0.79] - 0.01 * m_hat = [0.58, 0.7852632]
    #   (without AGC: u_0 = 0.18 / sqrt(0.0090234 / 0.001999) = 0.0847, p_0 = 0.5890)
    step_with(optimizer, [p], [[0.18, 0.0]])
    assert optimizer.clipped_fraction[0].item() == 0.0
    assert_close(p.data, torch.tensor([0.58, 0.7852631579], dtype=torch.float64), rtol=0.0, atol=1e-9)


def test_agc_uses_pmin_for_zero_parameters():
    # ||p|| = 0 -> limit 0.3 * 1e-3 = 3e-4, so g = [1, 0] becomes [3e-4, 0] and nu = 0.001 * 9e-8.
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = LaProp([p], lr=0.01, warmup=0)
    step_with(optimizer, [p], [[1.0, 0.0]])
    assert_close(optimizer.state[p]["nu"], torch.tensor([9e-11, 0.0], dtype=torch.float64), rtol=1e-12, atol=0.0)
    assert_close(p.data, torch.tensor([-0.01, 0.0], dtype=torch.float64), rtol=0.0, atol=1e-12)


def test_agc_zero_disables_clipping():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = LaProp([p], lr=0.01, warmup=0, agc=0.0)
    step_with(optimizer, [p], [[1.0, 0.0]])
    assert_close(optimizer.state[p]["nu"], torch.tensor([1e-3, 0.0], dtype=torch.float64), rtol=1e-12, atol=0.0)


def test_step_does_not_modify_the_gradient():
    p = torch.nn.Parameter(torch.tensor([0.6, 0.8]))
    optimizer = LaProp([p], warmup=0)
    step_with(optimizer, [p], [[3.0, 4.0]])
    assert torch.equal(p.grad, torch.tensor([3.0, 4.0]))


def test_linear_warmup():
    # A constant gradient gives nu_hat = g^2 and m_hat = sign(g) at every step, so each step
    # moves p by exactly lr * min(1, t / 4) * sign(g): 0.025, 0.05, 0.075, 0.1, 0.1.
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = LaProp([p], lr=0.1, warmup=4)
    deltas = []
    for _ in range(5):
        before = p.data.clone()
        step_with(optimizer, [p], [[1e-4, -2e-4]])
        deltas.append((p.data - before).tolist())
    expected = [[-0.1 * r, 0.1 * r] for r in (0.25, 0.5, 0.75, 1.0, 1.0)]
    assert_close(torch.tensor(deltas, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                 rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_gives_identical_next_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = LaProp(model.parameters(), lr=1e-2, warmup=3)
    inputs = torch.randn(5, 3)
    for _ in range(3):
        optimizer.zero_grad()
        model(inputs).pow(2).sum().backward()
        optimizer.step()

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    clone = copy.deepcopy(model)
    for param in clone.parameters():
        param.data.normal_()  # prove the weights come from the checkpoint
    clone.load_state_dict(saved["model"])
    clone_optimizer = LaProp(clone.parameters(), lr=123.0)  # hyperparameters come from the checkpoint
    clone_optimizer.load_state_dict(saved["optimizer"])

    for _ in range(2):
        for net, opt in ((model, optimizer), (clone, clone_optimizer)):
            opt.zero_grad()
            net(inputs).pow(2).sum().backward()
            opt.step()
    for original, restored in zip(model.parameters(), clone.parameters()):
        assert torch.equal(original, restored)
    assert clone_optimizer.state[next(clone.parameters())]["step"] == 5


def test_param_groups_with_different_learning_rates():
    # First step with warmup 0: each parameter moves by exactly lr * sign(g).
    a = torch.nn.Parameter(torch.tensor([1.0, 1.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = LaProp([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], warmup=0)
    step_with(optimizer, [a, b], [[0.01, -0.02], [0.05]])
    assert_close(a.data, torch.tensor([0.9, 1.1], dtype=torch.float64), rtol=0.0, atol=1e-12)
    assert_close(b.data, torch.tensor([0.99], dtype=torch.float64), rtol=0.0, atol=1e-12)
    assert len(optimizer.clipped_fraction) == 2


def test_parameters_without_gradient_are_left_alone():
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    optimizer = LaProp([a, b], warmup=0)
    step_with(optimizer, [a], [[0.01, 0.01]])
    assert torch.equal(b.data, torch.ones(2)) and b not in optimizer.state


def test_invalid_hyperparameters():
    with pytest.raises(ValueError):
        LaProp([torch.nn.Parameter(torch.ones(1))], betas=(0.9, 1.0))
    with pytest.raises(ValueError):
        LaProp([torch.nn.Parameter(torch.ones(1))], lr=-1.0)

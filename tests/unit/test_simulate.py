"""simulate: the closed form on a quadratic with a known answer, lr -> 0, and bad inputs."""

from __future__ import annotations

import pytest
import torch

from aquin_nb import AquinError
from aquin_nb.simulation import (
    gradient_and_curvature,
    ntk_diagonal_delta,
    read_training_rows,
    select_params,
)


def test_closed_form_matches_gradient_flow_on_a_diagonal_quadratic():
    """L(θ) = ½ Σ λ_k (θ_k − θ*_k)²: gradient flow gives θ* + (θ₀ − θ*) e^{−ηλT} exactly."""
    generator = torch.Generator().manual_seed(0)
    curvature = torch.rand(50, generator=generator, dtype=torch.float64) * 3
    curvature[:5] = 0.0  # flat directions: the λ → 0 limit −ηTg
    target = torch.randn(50, generator=generator, dtype=torch.float64)
    theta0 = torch.randn(50, generator=generator, dtype=torch.float64)
    lr, steps = 0.01, 200

    def loss_of(params, _example):
        return 0.5 * (curvature * (params["theta"] - target) ** 2).sum()

    gradient, estimated = gradient_and_curvature(
        loss_of, {"theta": theta0}, examples=[None] * 3, curvature="hutchinson"
    )
    torch.testing.assert_close(estimated["theta"], curvature)  # exact for a diagonal Hessian
    delta = ntk_diagonal_delta(gradient["theta"], estimated["theta"], lr, steps)
    analytic = (target - theta0) * (1 - torch.exp(-lr * curvature * steps))
    flat = curvature == 0
    analytic[flat] = -lr * steps * gradient["theta"][flat]
    torch.testing.assert_close(delta, analytic)

    # and it is what many tiny gradient-descent steps converge to
    theta, small_lr = theta0.clone(), lr / 100
    for _ in range(steps * 100):
        theta -= small_lr * curvature * (theta - target)
    torch.testing.assert_close(theta0 + delta, theta, rtol=1e-3, atol=1e-3)


def test_zero_learning_rate_moves_nothing():
    delta = ntk_diagonal_delta(torch.ones(4), torch.tensor([0.0, 1e-9, 1.0, 10.0]), 0.0, 100)
    assert torch.equal(delta, torch.zeros(4))


def test_training_rows_are_validated():
    assert read_training_rows(["plain", {"text": "t"}, {"instruction": "i", "response": "r"}])
    with pytest.raises(AquinError, match="holds no training rows"):
        read_training_rows([])
    with pytest.raises(
        AquinError, match="row 1 in the data list has an instruction but no response"
    ):
        read_training_rows(["ok", {"instruction": "question"}])


def test_parameter_filter_must_match_something():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert list(select_params(model, r"weight$")) == ["0.weight"]
    with pytest.raises(AquinError, match="matches no parameter"):
        select_params(model, r"attn")
    with pytest.raises(AquinError, match="not a valid regex"):
        select_params(model, r"(")

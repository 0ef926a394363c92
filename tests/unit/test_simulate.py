"""simulate: the closed form on a quadratic with a known answer, lr -> 0, the estimator's
sums (a batch in pieces, what it allocates), and bad inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aquin_nb import AquinError
from aquin_nb._curvature import Losses, gradient_and_curvature, ntk_diagonal_delta
from aquin_nb.simulation import read_training_rows, select_params


def test_closed_form_matches_gradient_flow_on_a_diagonal_quadratic():
    """L(θ) = ½ Σ λ_k (θ_k − θ*_k)²: gradient flow gives θ* + (θ₀ − θ*) e^{−ηλT} exactly."""
    generator = torch.Generator().manual_seed(0)
    curvature = torch.rand(50, generator=generator, dtype=torch.float64) * 3
    curvature[:5] = 0.0  # flat directions: the λ → 0 limit −ηTg
    target = torch.randn(50, generator=generator, dtype=torch.float64)
    theta0 = torch.randn(50, generator=generator, dtype=torch.float64)
    lr, steps = 0.01, 200

    def losses_of(_piece, _sample):
        return Losses(0.5 * (curvature * (theta0 - target) ** 2).sum())

    gradient, estimated = gradient_and_curvature(
        losses_of, {"theta": theta0}, examples=[[None]] * 3, curvature="hutchinson"
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


def _classifier(dtype: torch.dtype = torch.float32) -> torch.nn.Sequential:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32, bias=False), torch.nn.Tanh(), torch.nn.Linear(32, 8, bias=False)
    ).to(dtype)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _losses_of(model, rows_per_batch: int, generator: torch.Generator):
    """Cross-entropy on (inputs, labels) pieces, as simulate's token losses are built."""

    def losses_of(piece, sample):
        inputs, labels = piece
        log_probs = torch.log_softmax(model(inputs).float(), -1)
        mean = torch.nn.functional.nll_loss(log_probs, labels, reduction="sum") / rows_per_batch
        if not sample:
            return Losses(mean)
        with torch.no_grad():
            drawn = torch.multinomial(log_probs.exp(), 1, generator=generator).view(-1)
        sampled = torch.nn.functional.nll_loss(log_probs, drawn, reduction="sum")
        return Losses(mean, sampled, len(labels))

    return losses_of


def test_a_batch_in_pieces_gives_the_gradient_and_fisher_of_the_whole_batch():
    model = _classifier()
    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(3, 8, 16, generator=generator), torch.randint(8, (3, 8))
    moved = {"0.weight": model[0].weight}
    whole = [[(inputs[b], labels[b])] for b in range(3)]
    halves = [[(inputs[b, :4], labels[b, :4]), (inputs[b, 4:], labels[b, 4:])] for b in range(3)]
    (gradient, fisher), (gradient_in_pieces, fisher_in_pieces) = (
        gradient_and_curvature(_losses_of(model, 8, torch.Generator().manual_seed(1)), moved, ex)
        for ex in (whole, halves)
    )
    torch.testing.assert_close(gradient_in_pieces, gradient)
    torch.testing.assert_close(fisher_in_pieces, fisher)

    # the known answers, with plain autograd: the mean over batches of each batch's
    # mean-loss gradient, and the squared gradients of the loss with drawn labels
    weight = model[0].weight.detach().clone().requires_grad_(True)
    draws = torch.Generator().manual_seed(1)
    expected_gradient, expected_fisher = torch.zeros_like(weight), torch.zeros_like(weight)
    for b in range(3):
        log_probs = torch.log_softmax(model[2](torch.tanh(inputs[b] @ weight.T)), -1)
        drawn = torch.multinomial(log_probs.detach().exp(), 1, generator=draws).view(-1)
        mean_loss = torch.nn.functional.nll_loss(log_probs, labels[b])
        sampled_loss = torch.nn.functional.nll_loss(log_probs, drawn, reduction="sum")
        expected_gradient += torch.autograd.grad(mean_loss, weight, retain_graph=True)[0] / 3
        expected_fisher += torch.autograd.grad(sampled_loss, weight)[0] ** 2 / 24
    torch.testing.assert_close(gradient["0.weight"], expected_gradient)
    torch.testing.assert_close(fisher["0.weight"], expected_fisher)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation makes, backward's included."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
        return out


@pytest.mark.parametrize("curvature", ["fisher", "hutchinson"])
def test_the_sums_are_float32_for_the_moved_parameter_only_and_never_per_example(curvature):
    model = _classifier(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 8, 16, generator=generator).bfloat16()
    labels = torch.randint(8, (2, 8), generator=generator)
    batches = [[(inputs[b, :4], labels[b, :4]), (inputs[b, 4:], labels[b, 4:])] for b in range(2)]
    with _LargestTensor() as largest:
        gradient, curve = gradient_and_curvature(
            _losses_of(model, 8, generator),
            {"0.weight": model[0].weight},
            batches,
            curvature=curvature,
        )
    assert set(gradient) == set(curve) == {"0.weight"}
    for total in (gradient["0.weight"], curve["0.weight"]):
        assert total.shape == (32, 16) and total.dtype == torch.float32
        assert total.abs().sum() > 0
    # each gradient was handed over and dropped, none kept in .grad, and nothing left trainable
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    # a per-example (or per-piece) gradient of the moved weight would hold 4-8 x 512
    # numbers; nothing larger than the weight itself is ever made
    assert largest.numel == 32 * 16


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

"""bfloat16 cosines and a rigorous bound on their error.

Candidates and pricing look at every cell of the cosine matrix, so they use
bf16 matmuls (about 4x float32 on CPUs with AMX). What makes that safe is the
bound here: every bf16 cosine plus its bound is an upper bound on the exact
cosine, so an edge the bound rules out is ruled out exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# bfloat16 keeps 8 significant bits: the output of a bf16 matmul (float32
# accumulation, rounded to bf16) is within 2^-7 |value| of the float32 sum
# whether it is rounded to nearest or truncated (see `bf16_error`).
BF16_OUTPUT = 2.0**-7

# Blocks of the cosine matrix are computed this many bytes (float32) at a time:
# large enough for fast matmuls, small enough never to hold the matrix whole.
ROW_BLOCK_BYTES = 1 << 28


def row_block(n_cols: int) -> int:
    """Rows per block of a [rows, n_cols] cosine matrix (see ``ROW_BLOCK_BYTES``)."""
    return max(16, min(8192, ROW_BLOCK_BYTES // (4 * max(n_cols, 1))))


def _rounding_residual(x: torch.Tensor, x16: torch.Tensor) -> torch.Tensor:
    """Per row, an upper bound on the norm of ``x - x16`` (float32, in cache-sized chunks)."""
    out = torch.empty(len(x), dtype=torch.float32)
    step = 256
    for start in range(0, len(x), step):
        rows = slice(start, start + step)
        torch.linalg.vector_norm(x[rows] - x16[rows].float(), dim=1, out=out[rows])
    return out.double() * (1 + 1e-5)  # float32 norm: relative error far below 1e-5


def bf16_error(
    a: torch.Tensor, a16: torch.Tensor, b: torch.Tensor, b16: torch.Tensor
) -> torch.Tensor:
    """Per row of ``a``: a bound on |a16_i·b16_j - a_i·b_j| for every j, before
    the output rounding (add ``BF16_OUTPUT * |value|`` for that), with ``|a_i|, |b_j| <= 1``.

    With x = x_hi + x_lo (x_hi the bf16 rounding), a·b = a_hi·b_hi + a_lo·b + a_hi·b_lo,
    so by Cauchy-Schwarz the inputs' rounding costs at most |a_lo| + |a_hi| max_j |b_lo|.
    The float32 accumulation of the d exact bf16 products adds at most
    γ_d |a_hi| |b_hi| (γ_d = d u / (1 - d u), u = 2^-24). Measured rounding
    residuals (≈ 0.0017 per unit row) make this ≈ 0.004, against 2^-7 ≈ 0.008 for
    the worst case over all inputs.
    """
    d = a.shape[1]
    unit_roundoff = 2.0**-24
    gamma = d * unit_roundoff / (1 - d * unit_roundoff)
    slack = 1.0 + 1e-6  # the rows are unit length up to float32 rounding
    lo_a = _rounding_residual(a, a16)
    lo_b = float(_rounding_residual(b, b16).max()) if len(b) else 0.0
    hi_a = slack + lo_a
    return lo_a * slack + hi_a * lo_b + gamma * hi_a * (slack + lo_b) + 1e-30


@dataclass(frozen=True)
class Rounded:
    """bfloat16 copies of both sides and, per row of ``a``, the input part of the
    bound on |a16_i·b16_j - a_i·b_j| (see `bf16_error`).

    Made once per problem: candidates and every pricing round share the copies.
    """

    a16: torch.Tensor
    b16: torch.Tensor
    error: torch.Tensor  # float64, one per row of a

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> Rounded:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        return cls(a16, b16, bf16_error(a, a16, b, b16))

    def bounds(self, approx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per entry of a float32 block of bf16 cosines (rows of ``a`` given), the
        bound on its distance from the exact cosine."""
        return approx.abs().mul_(BF16_OUTPUT).add_(self.error[rows].float()[:, None])

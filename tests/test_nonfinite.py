"""The after-step finiteness count: one pass when all is finite, the exact count otherwise."""

from __future__ import annotations

import math

import torch

from dsvl_cli.train.nonfinite import count_nonfinite


def test_counts_tensors_holding_nan_or_inf() -> None:
    tensors = [torch.randn(8, 8), torch.randn(5), torch.randn(3, 2)]
    assert count_nonfinite(tensors) == 0 and count_nonfinite([]) == 0
    tensors[0][1, 2] = math.nan
    tensors[2][0, 1] = -math.inf
    assert count_nonfinite(tensors) == 2
    tensors[1][0] = 3.0e38  # huge but finite: not counted (a max-abs, not a sum of squares)
    assert count_nonfinite(tensors) == 2

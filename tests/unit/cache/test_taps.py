"""The hooks' float16 error bound at the edges of float16's rounding (R-4.3)."""

import numpy as np
import pytest
import torch
from torch import nn

from featlab.cache.taps import Slot, Taps
from featlab.cache.verify import _error_bound_of_stored


class _Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.src = nn.Identity()  # the point: its output is the input, as crafted below

    def forward(self, x):
        return self.src(x)


def _crafted(dtype: torch.dtype) -> torch.Tensor:
    rows = [
        [65519.0, -3.0],            # rounds down to 65504, the largest finite float16
        [65520.0, 1.0],             # rounds up to inf: an overflow
        [-2047.9, -0.5],            # all negative: the smallest rounds to -2048 (a new binade)
        [1.00048828125, 0.25],      # a tie between 1 and 1 + 2**-10: rounds to even, 1
        [1.0001, -1.00048828126],   # just past the tie below zero: rounds away, -(1 + 2**-10)
        [3e-8, -1e-7],              # subnormal in float16
        [0.0, -0.0],                # all zero
    ]
    x = torch.zeros((len(rows), 1, 2, 4), dtype=dtype)
    for i, values in enumerate(rows):
        x[i, 0, 0, :len(values)] = torch.tensor(values, dtype=dtype)
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_bound_is_that_of_the_stored_values_whatever_the_models_dtype(dtype):
    x = _crafted(dtype)
    n = len(x)
    slot = Slot(8, [(1, 2, 4)], torch.float16, (2, 4), save_images=False, pin=False)
    with Taps(_Root(), ["src"], ["src"], [(1, 2, 4)], [(2, 4)], [None], torch.float16,
              "bound") as taps:
        taps.run(x, slot, n)
    stored = slot.points[0][:n].numpy()
    np.testing.assert_array_equal(stored, x.to(torch.float16).numpy())  # one rounding, torch's
    error = slot.abs_error[:n, 0].numpy()
    finite = np.isfinite(stored.reshape(n, -1)).all(1)
    # numpy's spacing of the stored largest |value|, as verify recomputes it
    np.testing.assert_array_equal(error[finite], _error_bound_of_stored(stored)[finite])
    if dtype in (torch.float32, torch.float64):  # bfloat16 and float16 cannot hold 65520
        assert not finite[1] and np.isinf(error[1]) and slot.nonfinite[1, 0] == 1
    assert slot.nonfinite[:n, 0][finite].eq(0).all()

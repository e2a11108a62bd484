"""Value checks of received tensors: every float finite, the global L2 norm within a bound.

:class:`ValueScan` accumulates them over whole tensors or slices (a receiver scans each tensor's
elements as their bytes arrive); :func:`check_tensor_values` checks a mapping at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edge_sdk._errors import ProtocolError
from edge_sdk.protocol._wire import CLOSE_POLICY_VIOLATION

__all__ = ["ValueScan", "check_tensor_values"]

_NORM_BLOCK = 1 << 20  # elements per block when summing squares


class ValueScan:
    """Finite-value and sum-of-squares checks accumulated over tensors or parts of them, in any order.

    ``add(name, values)`` takes a whole floating-point tensor or any slice of one (a receiver scans
    each tensor's elements as their bytes arrive); integer tensors are skipped. :attr:`norm` is the
    global L2 norm; :meth:`check` also refuses NaN/Inf (naming their tensors) and a norm above a bound.
    """

    def __init__(self) -> None:
        self.sum_squares = 0.0
        self.nonfinite: dict[str, int] = {}

    def add(self, name: str, values: np.ndarray) -> None:
        if values.dtype.kind != "f":
            return
        flat = values.reshape(-1)
        for start in range(0, flat.size, _NORM_BLOCK):
            square_sum, bad = _block_sum_squares(flat[start : start + _NORM_BLOCK])
            if bad:
                self.nonfinite[name] = self.nonfinite.get(name, 0) + bad
            else:
                self.sum_squares += square_sum

    @property
    def norm(self) -> float:
        return math.sqrt(self.sum_squares)

    def check(self, *, max_norm: float | None = None, what: str = "tensors") -> float:
        """The global L2 norm; ProtocolError(1008) naming every tensor with NaN/Inf, or above ``max_norm``."""
        if self.nonfinite:
            listed = [f"{name!r} ({bad} NaN/Inf)" for name, bad in self.nonfinite.items()]
            raise ProtocolError(
                f"{what}: non-finite values in {len(listed)} tensor(s): {', '.join(listed)}",
                CLOSE_POLICY_VIOLATION,
            )
        norm = self.norm
        if max_norm is not None and not norm <= max_norm:
            raise ProtocolError(
                f"{what}: global L2 norm {norm:.6g} exceeds the bound {max_norm:.6g}", CLOSE_POLICY_VIOLATION
            )
        return norm


def _block_sum_squares(block: np.ndarray) -> tuple[float, int]:
    """(sum of squares, count of NaN/Inf) of one block of floats.

    Fast path: one BLAS dot product in the block's own precision (float16 widened to float32); a
    finite result proves every value finite (NaN and Inf propagate). Only a block whose dot product
    is not finite (a NaN/Inf, or squares beyond float32's range) is counted exactly in float64.
    """
    fast = block if block.dtype.itemsize >= 4 else block.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow or a NaN is handled below
        square_sum = float(np.dot(fast, fast))
    if math.isfinite(square_sum):
        return square_sum, 0
    with np.errstate(invalid="ignore"):  # a signalling NaN (a peer's arbitrary bytes) is counted below
        wide = block.astype(np.float64)
    finite = np.isfinite(wide)
    bad = int(wide.size - np.count_nonzero(finite))
    return (float(np.dot(wide, wide)) if bad == 0 else 0.0), bad


def check_tensor_values(
    tensors: Mapping[str, np.ndarray], *, max_norm: float | None = None, what: str = "tensors"
) -> float:
    """Check every floating-point value is finite and, if given, the global L2 norm is within ``max_norm``.

    Returns the global L2 norm over all floating-point tensors (integer tensors are skipped). Squares
    are summed per block with a dot product (float16 widened to float32, a non-finite result redone in
    float64), so float16 values cannot overflow the sum. ProtocolError(1008) names every tensor
    holding NaN or Inf, or gives the norm and the bound.
    """
    scan = ValueScan()
    for name, array in tensors.items():
        scan.add(name, array)
    return scan.check(max_norm=max_norm, what=what)

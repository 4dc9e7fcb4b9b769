"""Tolerances that say why: a count of float32 units in the last place (ulps) of the values compared.

Two compiled programs that compute the same real number can round differently: XLA fuses, blocks and vectorizes each
graph on its own, so a sum is added up in one order by one graph and in another by the next, by another device count,
or by another CPU (XLA:CPU's AVX2 and AVX-512 kernels block reductions differently). How far apart two such results
can land is a number of roundings at the magnitude of the result, so the tolerance is that many ulps of the value.

The rule for a sum of n terms of one sign in another order: each of its n - 1 additions rounds by at most half an
ulp of the running total, which is at most the final one, so two orders differ by up to about n ulps of the result;
a mean is the same sum scaled, so about n ulps of the mean. Terms that each differ by k ulps of their own add k more.
That is the worst case (random rounding gives about sqrt(n)), so n is a bound no reordering can pass and a real bug,
which moves the value by far more than rounding does, still fails.

Results of the same compiled program on the same inputs are bit-exact: compare those exactly, never with this.
"""

from __future__ import annotations

import numpy as np


def ulps(value, n: int) -> float:
    """`n` float32 ulps at the largest magnitude in `value` (a number or an array): an absolute tolerance."""
    return n * float(np.spacing(np.float32(np.max(np.abs(value)))))

"""The compiled kernel of `cross_entropy_cpu.py` (numba; importing this module loads or compiles it)."""
from __future__ import annotations

import numba
import numpy as np

BLOCK = 256  # rows transposed at a time: [C, BLOCK] float32 stays in L1
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = LN2_HI + LN2_LO (Cody & Waite)
LOWEST = np.float32(-87.0)  # exp(−87) ≈ 1.6e-38: the clamp for x_c − m (see cross_entropy_cpu.py)
# Fast-math flags without "nnan"/"ninf": the NaN and infinity checks must stay.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(numba.void(numba.float32[:, :, :], numba.int64[:], numba.float64[:], numba.int64[:]),
            cache=True, fastmath=FAST)
def cross_entropy_sums(logits, targets, loss, wrong):  # type: ignore[no-untyped-def]
    """loss[p] = Σ_n cross-entropy of logits[p, n] against targets[n]; wrong[p] = #{n: argmax ≠ target}."""
    points, rows, classes = logits.shape
    xt = np.empty((classes, BLOCK), np.float32)  # a block of rows, class-major
    top = np.empty(BLOCK, np.float32)
    first = np.empty(BLOCK, np.int32)  # argmax
    sums = np.empty(BLOCK, np.float32)  # Σ_c exp(x_c − m)
    bits = np.empty(BLOCK, np.int32)  # 2ⁿ as float32 bits
    scale = bits.view(np.float32)
    bad = np.empty(BLOCK, np.int32)  # NaN or +inf in the row
    picked = np.empty(BLOCK, np.float32)  # x_y − m
    losses = np.empty(BLOCK, np.float32)
    for p in range(points):
        total = 0.0
        misses = 0
        for start in range(0, rows, BLOCK):
            count = min(BLOCK, rows - start)
            block = logits[p, start:start + count]
            for c in range(classes):
                row = xt[c]
                for r in range(count):
                    row[r] = block[r, c]
            for r in range(count):
                v = xt[0, r]
                top[r], first[r], sums[r] = v, 0, 0
                bad[r] = np.int32((v != v) | (v == np.inf))
            for c in range(1, classes):
                row = xt[c]
                for r in range(count):
                    v = row[r]
                    greater = v > top[r]
                    top[r] = v if greater else top[r]
                    first[r] = np.int32(c) if greater else first[r]
                    bad[r] |= np.int32((v != v) | (v == np.inf))
            for c in range(classes):
                row = xt[c]
                for r in range(count):
                    d = row[r] - top[r]
                    d = d if d > LOWEST else LOWEST
                    n = np.floor(d * LOG2E + np.float32(0.5))
                    f = d - n * LN2_HI - n * LN2_LO
                    e = np.float32(1 / 5040)
                    e = np.float32(1 / 720) + f * e
                    e = np.float32(1 / 120) + f * e
                    e = np.float32(1 / 24) + f * e
                    e = np.float32(1 / 6) + f * e
                    e = np.float32(0.5) + f * e
                    e = np.float32(1.0) + f * e
                    e = np.float32(1.0) + f * e
                    bits[r] = (np.int32(n) + np.int32(127)) << 23
                    sums[r] += e * scale[r]
            for r in range(count):  # x_y − m, and the wrong arg-max count
                target = targets[start + r]
                picked[r] = xt[target, r] - top[r]
                misses += first[r] != target
            for r in range(count):  # log s = e ln 2 + log μ, s = μ 2^e with μ in [1, 2)
                scale[r] = sums[r]
                exponent = np.float32((bits[r] >> 23) - 127)
                bits[r] = (bits[r] & np.int32(0x7FFFFF)) | np.int32(0x3F800000)
                z = (scale[r] - np.float32(1.0)) / (scale[r] + np.float32(1.0))  # log μ = 2 atanh z, z ≤ 1/3
                z2 = z * z
                series = np.float32(1 / 13)
                series = np.float32(1 / 11) + z2 * series
                series = np.float32(1 / 9) + z2 * series
                series = np.float32(1 / 7) + z2 * series
                series = np.float32(1 / 5) + z2 * series
                series = np.float32(1 / 3) + z2 * series
                series = np.float32(1.0) + z2 * series
                value = exponent * LN2 + np.float32(2.0) * z * series - picked[r]
                losses[r] = value if bad[r] == 0 and top[r] != -np.inf else np.float32(np.nan)
            for r in range(count):
                total += losses[r]
        loss[p] = total
        wrong[p] = misses

"""The engine's compiled CPU kernels (numba; importing this module loads them from numba's cache or compiles them;
`compiled_cpu.py` does so in the background). Each has one signature: float32 values, any strides.

`cross_entropy_sums`: cross-entropy and arg-max errors of narrow logits, per point. For logits x [P, N, C] (C
small, e.g. 10 digits), class targets y [N], and every point p:

    m = max_c x_c,   loss(p) = Σ_n [ log Σ_c exp(x_c − m) − (x_y − m) ],   wrong(p) = #{n : argmax_c x_c ≠ y}

(argmax: the first class holding the maximum, as torch's). torch runs these as six passes over the logits, each
slow on a class axis this narrow; the kernel reads them once, a block of rows at a time transposed into a class-
major buffer, so that the max, the exponentials and the sums run over contiguous rows (vectorised). exp has no
vector form in numba without Intel's SVML, so it is written out: exp(d) = 2ⁿ · e^f with n = round(d / ln 2),
f = d − n ln 2 (|f| ≤ ln 2 / 2, ln 2 in two parts as in Cody & Waite 1980) and e^f its Taylor polynomial of
degree 7 (relative error < 1e-8, below float32 rounding); d = x_c − m ≤ 0 is clamped at −87, where exp(d) is
below float32's smallest normal number and adds nothing a float32 sum could keep. log s (s in [1, C]) is written
out too: s = μ 2^e with μ in [1, 2), log μ = 2 atanh z = 2 Σ z^(2j+1)/(2j+1), z = (μ − 1)/(μ + 1) ≤ 1/3, to
j = 6. Each row's loss is summed per point in float64. A row with NaN or +inf, or whose logits are all −inf,
gives NaN (as F.cross_entropy does).
"""
from __future__ import annotations

import numba
import numpy as np

BLOCK = 256  # rows transposed at a time: [C, BLOCK] float32 stays in L1
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = LN2_HI + LN2_LO (Cody & Waite)
LOWEST = np.float32(-87.0)  # exp(−87) ≈ 1.6e-38: the clamp for x_c − m
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


@numba.njit(inline="always", fastmath=FAST)
def _max(v, m):  # type: ignore[no-untyped-def]
    """max(v, m), NaN if either is NaN (torch.maximum)."""
    return v if (v > m) | (v != v) else m


@numba.njit(inline="always", fastmath=FAST)
def _max_of_rows(source, top, row, pairs):  # type: ignore[no-untyped-def]
    """pairs[e] = max(source[top + e], source[top + row + e]) for e < row: a 2×2 pooling's row pairs."""
    for e in range(row):
        pairs[e] = _max(source[top + row + e], source[top + e])


@numba.njit(numba.void(numba.float32[:, :, :, :, ::1], numba.float32[:, :], numba.float32[:, :], numba.float32[:, :],
                       numba.boolean, numba.float32[:, :, :, :, :]), cache=True, fastmath=FAST)
def mix_pool_block(per_basis, coeffs, scale, shift, relu, out):  # type: ignore[no-untyped-def]
    """out[p, n, c, i, j] = relu(max over the 2×2 window (2i…2i+1, 2j…2j+1) of Σ_k coeffs[p,k] per_basis[k, n,
    ·, ·, c], times scale[p, c], plus shift[p, c]) of contiguous channels-last K outputs [K, N, H, W, C]
    (`conv_block.py`; for scale ≥ 0 the same numbers as pooling after the affine map) into out [P, N, C, H', W']
    of any strides (point-major NCHW, or a view of sample-major channels-last [N, H', W', P, C] memory).
    NaN propagates through the max, as in torch.maximum, and through the ReLU."""
    bases, samples, height, width, channels = per_basis.shape
    size, row = height * width * channels, width * channels
    flat = per_basis.reshape(bases, samples, size)
    mixed = np.empty(size, np.float32)  # one sample's map at point p
    pairs = np.empty(row, np.float32)  # the max of two rows of it
    pooled = np.empty(channels, np.float32)
    for p in range(coeffs.shape[0]):
        point_scale, point_shift = scale[p].copy(), shift[p].copy()
        for n in range(samples):
            weight = coeffs[p, 0]
            source = flat[0, n]
            for e in range(size):
                mixed[e] = weight * source[e]
            for k in range(1, bases):
                weight = coeffs[p, k]
                source = flat[k, n]
                for e in range(size):
                    mixed[e] += weight * source[e]
            target = out[p, n]
            for i in range(height // 2):
                _max_of_rows(mixed, 2 * i * row, row, pairs)
                for j in range(width // 2):
                    for c in range(channels):
                        v, m = pairs[(2 * j + 1) * channels + c], pairs[2 * j * channels + c]
                        y = _max(v, m) * point_scale[c] + point_shift[c]
                        pooled[c] = y if not relu or not y < 0 else np.float32(0.0)
                    for c in range(channels):
                        target[c, i, j] = pooled[c]


@numba.njit(numba.void(numba.float32[:, :, :, ::1], numba.float32[:, :], numba.float32[:, :], numba.boolean,
                       numba.float32[:, :, :, :, :]), cache=True, fastmath=FAST)
def pool_block(maps, scale, shift, relu, out):  # type: ignore[no-untyped-def]
    """out[p, n, c, i, j] = relu(max over the 2×2 window of maps[n, ·, ·, p·C + c], times scale[p, c], plus
    shift[p, c]) of a grouped convolution's sample-major channels-last output maps [N, H, W, P·C] (`conv_block.py`;
    for scale ≥ 0 the same numbers as pooling after the affine map) into out [P, N, C, H', W'] of any strides.
    NaN propagates."""
    samples, height, width, point_channels = maps.shape
    points, channels = scale.shape
    row = width * point_channels
    flat = maps.reshape(samples, height * row)
    pairs = np.empty(row, np.float32)  # the max of two rows of a sample's map
    pooled = np.empty(channels, np.float32)
    for n in range(samples):
        source = flat[n]
        for i in range(height // 2):
            _max_of_rows(source, 2 * i * row, row, pairs)
            for j in range(width // 2):
                left, right = 2 * j * point_channels, (2 * j + 1) * point_channels
                for p in range(points):
                    for c in range(channels):
                        v, m = pairs[right + p * channels + c], pairs[left + p * channels + c]
                        y = _max(v, m) * scale[p, c] + shift[p, c]
                        pooled[c] = y if not relu or not y < 0 else np.float32(0.0)
                    target = out[p, n]
                    for c in range(channels):
                        target[c, i, j] = pooled[c]


@numba.njit(numba.void(numba.float32[:, :, ::1], numba.float64[:, ::1], numba.float64[:, :, ::1]), cache=True,
            fastmath=FAST)
def moments(values, mean, covariance):  # type: ignore[no-untyped-def]
    """mean[k, c] = E_m values[k, m, c] and covariance[c, k, l] = E_m (values[k,m,c] − mean[k,c])(values[l,m,c] −
    mean[l,c]) of K outputs [K, M, C] (`conv_block._moments`), in float64 without a float64 copy of the values:
    two passes, the mean first, as the torch path."""
    bases, count, channels = values.shape
    mean[:] = 0
    for k in range(bases):
        for m in range(count):
            for c in range(channels):
                mean[k, c] += values[k, m, c]
    mean /= count
    deviation = np.empty((bases, channels), np.float64)
    products = np.zeros((bases, bases, channels), np.float64)  # [k, l ≤ k, c]
    for m in range(count):
        for k in range(bases):
            for c in range(channels):
                deviation[k, c] = values[k, m, c] - mean[k, c]
        for k in range(bases):
            for l in range(k + 1):
                for c in range(channels):
                    products[k, l, c] += deviation[k, c] * deviation[l, c]
    for k in range(bases):
        for l in range(k + 1):
            for c in range(channels):
                covariance[c, k, l] = covariance[c, l, k] = products[k, l, c] / count


@numba.njit(numba.void(numba.float32[:, ::1], numba.float32[::1], numba.float32[::1]), cache=True, fastmath=FAST)
def column_statistics(values, mean, var):  # type: ignore[no-untyped-def]
    """mean[j] and biased var[j] over the rows of values [M, J] (a grouped convolution's channels-last output,
    J = P·C): two passes, the mean first, as BatchNorm's, accumulated in float64 (`conv_block._statistics`)."""
    rows, columns = values.shape
    sums = np.zeros(columns, np.float64)
    for m in range(rows):
        for j in range(columns):
            sums[j] += values[m, j]
    centre = sums / rows
    squares = np.zeros(columns, np.float64)
    for m in range(rows):
        for j in range(columns):
            d = values[m, j] - centre[j]
            squares[j] += d * d
    for j in range(columns):
        mean[j] = np.float32(centre[j])
        var[j] = np.float32(squares[j] / rows)

"""The engine's compiled CPU kernels (numba; importing this module loads them from numba's cache or compiles them;
`compiled_cpu.py` does so in the background). Each has one signature: float32 values, any strides, and releases the
GIL while it runs (evaluation lanes, `lanes.py`, run other threads' Python meanwhile).

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

import threading

import numba
import numpy as np

BLOCK = 256  # rows transposed at a time: [C, BLOCK] float32 stays in L1
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = LN2_HI + LN2_LO (Cody & Waite)
LOWEST = np.float32(-87.0)  # exp(−87) ≈ 1.6e-38: the clamp for x_c − m
# Fast-math flags without "nnan"/"ninf": the NaN and infinity checks must stay.
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@numba.njit(inline="always", fastmath=FAST)
def _class_major_cross_entropy(xt, count, targets, scratch):  # type: ignore[no-untyped-def]
    """(Σ_r cross-entropy, #{r: argmax ≠ target}) of the rows r < count of class-major logits xt [C, ≥ count]
    against targets [count] (the formulas above); scratch: float32 [6, ≥ count]."""
    classes = xt.shape[0]
    top, sums, picked, losses = scratch[0], scratch[1], scratch[2], scratch[3]
    first = scratch[4].view(np.int32)  # argmax
    bad = scratch[5].view(np.int32)  # NaN or +inf in the row
    bits = picked.view(np.int32)  # 2ⁿ as float32 bits (picked is written after the exponentials)
    scale = picked
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
    misses = 0
    for r in range(count):  # x_y − m, and the wrong arg-max count
        target = targets[r]
        picked[r] = xt[target, r] - top[r]
        misses += first[r] != target
    total = 0.0
    bits = losses.view(np.int32)  # s = μ 2^e as float32 bits, then μ
    for r in range(count):  # log s = e ln 2 + log μ, s = μ 2^e with μ in [1, 2)
        losses[r] = sums[r]
        exponent = np.float32((bits[r] >> 23) - 127)
        bits[r] = (bits[r] & np.int32(0x7FFFFF)) | np.int32(0x3F800000)
        mu = losses[r]
        z = (mu - np.float32(1.0)) / (mu + np.float32(1.0))  # log μ = 2 atanh z, z ≤ 1/3
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
    return total, misses


@numba.njit(numba.void(numba.float32[:, :, :], numba.int64[:], numba.float64[:], numba.int64[:]),
            cache=True, nogil=True, fastmath=FAST)
def cross_entropy_sums(logits, targets, loss, wrong):  # type: ignore[no-untyped-def]
    """loss[p] = Σ_n cross-entropy of logits[p, n] against targets[n]; wrong[p] = #{n: argmax ≠ target}."""
    points, rows, classes = logits.shape
    xt = np.empty((classes, BLOCK), np.float32)  # a block of rows, class-major
    scratch = np.empty((6, BLOCK), np.float32)
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
            block_loss, block_misses = _class_major_cross_entropy(xt, count, targets[start:start + count], scratch)
            total += block_loss
            misses += block_misses
        loss[p] = total
        wrong[p] = misses


def use_threads(count: int) -> None:
    """Run the parallel kernels on `count` threads (at most numba's pool; e.g. torch.get_num_threads()); numba's
    setting is per calling thread, and set again only where it changes (setting it costs as much as a small kernel)."""
    count = max(1, min(count, numba.config.NUMBA_NUM_THREADS))
    if getattr(_threads_set, "count", None) != count:
        numba.set_num_threads(count)
        _threads_set.count = count


_threads_set = threading.local()  # the count `use_threads` last set in each thread


ROWS = 256  # rows of samples carried through all layers at a time (B1, one thread: 1.3× faster than 64, as 512)


@numba.njit(inline="always", fastmath=FAST)
def _relu(acc, count):  # type: ignore[no-untyped-def]
    """max(acc[r], 0) in place for r < count; NaN stays NaN (torch.relu)."""
    for r in range(count):
        acc[r] = np.float32(0.0) if acc[r] < 0 else acc[r]


@numba.njit(inline="always", fastmath=FAST)
def _dense_row(h, acc, w, b, count, relu):  # type: ignore[no-untyped-def]
    """acc[r] = b + Σ_i w[i] h[i, r] for r < count (then ReLU): one output of `_dense`."""
    for r in range(count):
        acc[r] = b
    i = 0
    while i + 4 <= w.shape[0]:
        w0, w1, w2, w3 = w[i], w[i + 1], w[i + 2], w[i + 3]
        h0, h1, h2, h3 = h[i], h[i + 1], h[i + 2], h[i + 3]
        for r in range(count):
            acc[r] += w0 * h0[r] + w1 * h1[r] + w2 * h2[r] + w3 * h3[r]
        i += 4
    for rest in range(i, w.shape[0]):
        w0, h0 = w[rest], h[rest]
        for r in range(count):
            acc[r] += w0 * h0[r]
    if relu:
        _relu(acc, count)


@numba.njit(inline="always", fastmath=FAST)
def _dense(h, out, weights, bias, count, relu):  # type: ignore[no-untyped-def]
    """out[j, r] = bias[j] + Σ_i weights[j, i] h[i, r] for r < count, then max(·, 0) if relu (NaN stays): a
    Linear on feature-major activations h [Din, ≥ count]. Two outputs and four inputs per pass over the rows: 8
    multiply-adds for 6 loads and 2 stores, within what a core issues per cycle (one output at a time, the stores
    bound it: B1's layers ran 1.3× slower so)."""
    outputs, inputs = weights.shape
    for j in range(0, outputs - 1, 2):
        acc0, acc1 = out[j], out[j + 1]
        wa, wb = weights[j], weights[j + 1]
        ba, bb = bias[j], bias[j + 1]
        for r in range(count):
            acc0[r] = ba
            acc1[r] = bb
        i = 0
        while i + 4 <= inputs:
            a0, a1, a2, a3 = wa[i], wa[i + 1], wa[i + 2], wa[i + 3]
            b0, b1, b2, b3 = wb[i], wb[i + 1], wb[i + 2], wb[i + 3]
            h0, h1, h2, h3 = h[i], h[i + 1], h[i + 2], h[i + 3]
            for r in range(count):
                x0, x1, x2, x3 = h0[r], h1[r], h2[r], h3[r]
                acc0[r] += a0 * x0 + a1 * x1 + a2 * x2 + a3 * x3
                acc1[r] += b0 * x0 + b1 * x1 + b2 * x2 + b3 * x3
            i += 4
        for rest in range(i, inputs):
            a0, b0, h0 = wa[rest], wb[rest], h[rest]
            for r in range(count):
                acc0[r] += a0 * h0[r]
                acc1[r] += b0 * h0[r]
        if relu:
            _relu(acc0, count)
            _relu(acc1, count)
    if outputs % 2:
        _dense_row(h, out[outputs - 1], weights[outputs - 1], bias[outputs - 1], count, relu)


@numba.njit(numba.void(numba.float32[:, :, ::1], numba.boolean, numba.float32[:, ::1], numba.float32[:, ::1],
                       numba.float32[:, ::1], numba.int64[:, ::1], numba.int64[::1], numba.float64[::1],
                       numba.int64[::1]), cache=True, nogil=True, parallel=True, fastmath=FAST)
def mlp_cross_entropy_sums(  # type: ignore[no-untyped-def]
        first, first_relu, coeffs, weights, biases, layers, targets, loss, wrong):
    """An MLP at P points, its cross-entropy and arg-max errors summed per point (`cross_entropy_sums` of its
    logits, which never leave the cache): a row block's activations go through every layer before the next block.

    first [K, D1, N]: the first Linear's outputs Y_k = X W_kᵀ + b_k of the shared input X for each basis member,
    feature-major; h1 = Σ_k coeffs[p,k] Y_k, then ReLU if first_relu. Layer l > 1, layers[l] = (weight offset,
    bias offset, Dout, Din, relu): W_k = weights[k, offset : offset + Dout·Din] as [Dout, Din], b_k likewise from
    biases; at point p, W(p) = Σ_k coeffs[p,k] W_k (and b(p)). The last layer gives the logits (no ReLU). Points
    run in parallel (numba threads)."""
    bases, width, rows = first.shape
    widest = width
    for l in range(layers.shape[0]):
        widest = max(widest, layers[l, 2])
    for p in numba.prange(coeffs.shape[0]):
        mixed_w = np.empty(weights.shape[1], np.float32)
        mixed_b = np.empty(biases.shape[1], np.float32)
        for e in range(weights.shape[1]):
            mixed_w[e] = coeffs[p, 0] * weights[0, e]
        for e in range(biases.shape[1]):
            mixed_b[e] = coeffs[p, 0] * biases[0, e]
        for k in range(1, bases):
            for e in range(weights.shape[1]):
                mixed_w[e] += coeffs[p, k] * weights[k, e]
            for e in range(biases.shape[1]):
                mixed_b[e] += coeffs[p, k] * biases[k, e]
        h = np.empty((widest, ROWS), np.float32)
        out = np.empty((widest, ROWS), np.float32)
        scratch = np.empty((6, ROWS), np.float32)
        total = 0.0
        misses = 0
        for start in range(0, rows, ROWS):
            count = min(ROWS, rows - start)
            for i in range(width):
                row = h[i]
                c = coeffs[p, 0]
                source = first[0, i, start:start + count]
                for r in range(count):
                    row[r] = c * source[r]
                for k in range(1, bases):
                    c = coeffs[p, k]
                    source = first[k, i, start:start + count]
                    for r in range(count):
                        row[r] += c * source[r]
                if first_relu:
                    _relu(row, count)
            for l in range(layers.shape[0]):
                w_at, b_at, outputs, inputs, relu = layers[l, 0], layers[l, 1], layers[l, 2], layers[l, 3], layers[l, 4]
                _dense(h, out, mixed_w[w_at:w_at + outputs * inputs].reshape((outputs, inputs)),
                       mixed_b[b_at:b_at + outputs], count, relu != 0)
                h, out = out, h
            classes = layers[layers.shape[0] - 1, 2]
            block_loss, block_misses = _class_major_cross_entropy(h[:classes], count, targets[start:start + count],
                                                                  scratch)
            total += block_loss
            misses += block_misses
        loss[p] = total
        wrong[p] = misses


@numba.njit(inline="always", fastmath=FAST)
def _max(v, m):  # type: ignore[no-untyped-def]
    """max(v, m), NaN if either is NaN (torch.maximum)."""
    return v if (v > m) | (v != v) else m


@numba.njit(inline="always", fastmath=FAST)
def _mixed_row_pair_max(flat, n, start, weights, upper, pairs):  # type: ignore[no-untyped-def]
    """pairs[e] = max(m[start + e], m[start + R + e]) for e < R = len(pairs), m = Σ_k weights[k] flat[k, n]: the
    max of two consecutive rows of a sample's mixed map (upper: scratch of R values). Three members (a quadratic
    Bezier curve, a plane) in one pass with the sums in registers. (Loops here index slices by the loop variable
    alone: a computed index gets numba's negative-index check, which stops LLVM from vectorising the loop.)"""
    count = pairs.shape[0]
    if flat.shape[0] == 3:
        w0, w1, w2 = weights[0], weights[1], weights[2]
        a0, b0 = flat[0, n, start:start + count], flat[0, n, start + count:start + 2 * count]
        a1, b1 = flat[1, n, start:start + count], flat[1, n, start + count:start + 2 * count]
        a2, b2 = flat[2, n, start:start + count], flat[2, n, start + count:start + 2 * count]
        for e in range(count):
            pairs[e] = _max(w0 * b0[e] + w1 * b1[e] + w2 * b2[e], w0 * a0[e] + w1 * a1[e] + w2 * a2[e])
        return
    for k in range(flat.shape[0]):
        w = weights[k]
        a, b = flat[k, n, start:start + count], flat[k, n, start + count:start + 2 * count]
        if k == 0:
            for e in range(count):
                upper[e] = w * a[e]
                pairs[e] = w * b[e]
        else:
            for e in range(count):
                upper[e] += w * a[e]
                pairs[e] += w * b[e]
    for e in range(count):
        pairs[e] = _max(pairs[e], upper[e])


@numba.njit(numba.void(numba.float32[:, :, :, :, ::1], numba.float32[:, :], numba.float32[:, :], numba.float32[:, :],
                       numba.boolean, numba.float32[:, :, :, :, :]), cache=True, nogil=True, fastmath=FAST)
def mix_pool_block(per_basis, coeffs, scale, shift, relu, out):  # type: ignore[no-untyped-def]
    """out[p, n, c, i, j] = relu(max over the 2×2 window (2i…2i+1, 2j…2j+1) of Σ_k coeffs[p,k] per_basis[k, n,
    ·, ·, c], times scale[p, c], plus shift[p, c]) of contiguous channels-last K outputs [K, N, H, W, C]
    (`conv_block.py`; for scale ≥ 0 the same numbers as pooling after the affine map) into out [P, N, C, H', W']
    of any strides (point-major NCHW, or a view of sample-major channels-last [N, H', W', P, C] memory).
    NaN propagates through the max, as in torch.maximum, and through the ReLU. Samples outer, points inner: a
    sample's K maps stay in cache while every point is mixed from them."""
    bases, samples, height, width, channels = per_basis.shape
    row = width * channels
    flat = per_basis.reshape(bases, samples, height * row)
    weights, scales, shifts = np.ascontiguousarray(coeffs), np.ascontiguousarray(scale), np.ascontiguousarray(shift)
    upper = np.empty(row, np.float32)  # row 2i of a sample's map at point p
    pairs = np.empty(row, np.float32)  # the max of its rows 2i and 2i + 1
    pooled = np.empty(channels, np.float32)
    for n in range(samples):
        for p in range(weights.shape[0]):
            point_scale, point_shift, target = scales[p], shifts[p], out[p, n]
            for i in range(height // 2):
                _mixed_row_pair_max(flat, n, 2 * i * row, weights[p], upper, pairs)
                for j in range(width // 2):
                    left = pairs[2 * j * channels:(2 * j + 1) * channels]
                    right = pairs[(2 * j + 1) * channels:(2 * j + 2) * channels]
                    for c in range(channels):
                        y = _max(right[c], left[c]) * point_scale[c] + point_shift[c]
                        pooled[c] = y if not relu or not y < 0 else np.float32(0.0)
                    destination = target[:, i, j]
                    for c in range(channels):
                        destination[c] = pooled[c]


@numba.njit(numba.void(numba.float32[:, :, :, :, ::1], numba.float32[:, :], numba.float32[:, :], numba.float32[:, :],
                       numba.boolean, numba.float32[:, :, :, :, ::1]), cache=True, nogil=True, parallel=True,
            fastmath=FAST)
def mix_of_three_pool_block(per_basis, coeffs, scale, shift, relu, out):  # type: ignore[no-untyped-def]
    """`mix_pool_block` for K = 3 members (a quadratic Bezier curve, a plane) into contiguous sample-major memory
    out [N, H', W', P, C]: per sample, output position and point, the four window positions' mixes, their max,
    the affine map and ReLU in one vectorised run over the C channels (B3's [3, 128, 8, 8, 16] to 11 points on one
    core: 0.23 ms against 0.42 ms for `mix_pool_block`). Indices are unsigned and flat: numba checks signed ones
    for negative values, which costs as much as the arithmetic on runs this short."""
    bases, samples, height, width, channels = per_basis.shape
    points = coeffs.shape[0]
    values = per_basis.reshape(-1)
    weights = np.ascontiguousarray(coeffs).reshape(-1)
    scales, shifts = np.ascontiguousarray(scale).reshape(-1), np.ascontiguousarray(shift).reshape(-1)
    target = out.reshape(-1)
    c_count, three = np.uint64(channels), np.uint64(3)
    row = np.uint64(width) * c_count
    plane = np.uint64(height) * row
    member = np.uint64(samples) * plane  # from one member's outputs to the next's
    zero = np.float32(0.0)
    per_sample = np.uint64((height // 2) * (width // 2) * points) * c_count
    for sample in numba.prange(samples):  # samples in parallel over numba threads
        n = np.uint64(sample)
        written = n * per_sample  # out is written in its memory order
        for i in range(np.uint64(height // 2)):
            for j in range(np.uint64(width // 2)):
                first = n * plane + np.uint64(2) * i * row + np.uint64(2) * j * c_count  # the window's top left
                second, third = first + member, first + member + member
                for p in range(np.uint64(points)):
                    w0, w1, w2 = weights[p * three], weights[p * three + np.uint64(1)], weights[p * three + np.uint64(2)]
                    affine = p * c_count
                    for c in range(c_count):
                        top_left = w0 * values[first + c] + w1 * values[second + c] + w2 * values[third + c]
                        top_right = (w0 * values[first + c_count + c] + w1 * values[second + c_count + c]
                                     + w2 * values[third + c_count + c])
                        bottom_left = w0 * values[first + row + c] + w1 * values[second + row + c] + w2 * values[third + row + c]
                        bottom_right = (w0 * values[first + row + c_count + c] + w1 * values[second + row + c_count + c]
                                        + w2 * values[third + row + c_count + c])
                        y = (_max(_max(bottom_right, bottom_left), _max(top_right, top_left)) * scales[affine + c]
                             + shifts[affine + c])
                        target[written + c] = y if not relu or not y < 0 else zero
                    written += c_count


@numba.njit(numba.void(numba.float32[:, :, :, ::1], numba.float32[:, :], numba.float32[:, :], numba.boolean,
                       numba.float32[:, :, :, :, :]), cache=True, nogil=True, parallel=True, fastmath=FAST)
def pool_block(maps, scale, shift, relu, out):  # type: ignore[no-untyped-def]
    """out[p, n, c, i, j] = relu(max over the 2×2 window of maps[n, ·, ·, p·C + c], times scale[p, c], plus
    shift[p, c]) of a grouped convolution's sample-major channels-last output maps [N, H, W, P·C] (`conv_block.py`;
    for scale ≥ 0 the same numbers as pooling after the affine map) into out [P, N, C, H', W'] of any strides.
    NaN propagates."""
    samples, height, width, point_channels = maps.shape
    points, channels = scale.shape
    row = width * point_channels
    flat = maps.reshape(samples, height * row)
    scales, shifts = np.ascontiguousarray(scale).reshape(-1), np.ascontiguousarray(shift).reshape(-1)
    for n in numba.prange(samples):  # samples in parallel over numba threads
        pairs = np.empty(row, np.float32)  # the max of two rows of a sample's map
        pooled = np.empty(point_channels, np.float32)  # one position's outputs at every point
        for i in range(height // 2):
            upper = flat[n, 2 * i * row:(2 * i + 1) * row]
            lower = flat[n, (2 * i + 1) * row:(2 * i + 2) * row]
            for e in range(row):
                pairs[e] = _max(lower[e], upper[e])
            for j in range(width // 2):
                left = pairs[2 * j * point_channels:(2 * j + 1) * point_channels]
                right = pairs[(2 * j + 1) * point_channels:(2 * j + 2) * point_channels]
                for e in range(point_channels):
                    y = _max(right[e], left[e]) * scales[e] + shifts[e]
                    pooled[e] = y if not relu or not y < 0 else np.float32(0.0)
                for p in range(points):
                    destination = out[p, n, :, i, j]
                    point = pooled[p * channels:(p + 1) * channels]
                    for c in range(channels):
                        destination[c] = point[c]


@numba.njit(numba.void(numba.float32[:, :, ::1], numba.float64[:, ::1], numba.float64[:, :, ::1]), cache=True,
            nogil=True, fastmath=FAST)
def moments(values, mean, covariance):  # type: ignore[no-untyped-def]
    """mean[k, c] = E_m values[k, m, c] and covariance[c, k, l] = E_m (values[k,m,c] − mean[k,c])(values[l,m,c] −
    mean[l,c]) of K outputs [K, M, C] (`conv_block._moments`), in float64 without a float64 copy of the values:
    two passes, the mean first, as the torch path. Each pass runs over blocks of rows as flat runs of ~256 values,
    summed into a run of partial sums per (k, l) that are folded per channel at the end (long vectorised loops
    where a loop over C channels would be short)."""
    bases, count, channels = values.shape
    block = max(1, 256 // channels)  # rows per run
    width = block * channels
    flat = values.reshape(bases, count * channels)
    partial = np.zeros((bases, width), np.float64)
    for k in range(bases):
        sums = partial[k]
        for start in range(0, count * channels, width):
            source = flat[k, start:start + width]
            for e in range(source.shape[0]):
                sums[e] += source[e]
    centres = np.empty((bases, width), np.float64)  # mean[k] repeated for every row of a run
    for k in range(bases):
        for c in range(channels):
            total = 0.0
            for r in range(block):
                total += partial[k, r * channels + c]
            mean[k, c] = total / count
        for r in range(block):
            centres[k, r * channels:(r + 1) * channels] = mean[k]
    deviation = np.empty((bases, width), np.float64)
    products = np.zeros((bases, bases, width), np.float64)  # [k, l ≤ k, run]
    for start in range(0, count * channels, width):
        size = min(width, count * channels - start)
        for k in range(bases):
            source, centre, d = flat[k, start:start + size], centres[k], deviation[k]
            for e in range(size):
                d[e] = source[e] - centre[e]
        for k in range(bases):
            for l in range(k + 1):
                a, b, sums = deviation[k], deviation[l], products[k, l]
                for e in range(size):
                    sums[e] += a[e] * b[e]
    for k in range(bases):
        for l in range(k + 1):
            for c in range(channels):
                total = 0.0
                for r in range(block):
                    total += products[k, l, r * channels + c]
                covariance[c, k, l] = covariance[c, l, k] = total / count


@numba.njit(numba.void(numba.float32[:, ::1], numba.float32[::1], numba.float32[::1]), cache=True, parallel=True,
            nogil=True, fastmath=FAST)
def column_statistics(values, mean, var):  # type: ignore[no-untyped-def]
    """mean[j] and biased var[j] over the rows of values [M, J] (a grouped convolution's channels-last output,
    J = P·C): two passes, the mean first, as BatchNorm's, accumulated in float64 (`conv_block._statistics`); blocks
    of columns in parallel over numba threads."""
    rows, columns = values.shape
    blocks = max(1, min(64, columns // 32))  # runs of at least 32 columns, shared out among the threads
    for block in numba.prange(blocks):
        start, stop = block * columns // blocks, (block + 1) * columns // blocks
        sums = np.zeros(stop - start, np.float64)
        for m in range(rows):
            source = values[m, start:stop]
            for j in range(stop - start):
                sums[j] += source[j]
        centre = sums / rows
        squares = np.zeros(stop - start, np.float64)
        for m in range(rows):
            source = values[m, start:stop]
            for j in range(stop - start):
                d = source[j] - centre[j]
                squares[j] += d * d
        for j in range(stop - start):
            mean[start + j] = np.float32(centre[j])
            var[start + j] = np.float32(squares[j] / rows)


TAIL_ROWS = 32  # samples per block of `pool_linear_cross_entropy_sums` (blocks run in parallel)


@numba.njit(numba.void(numba.float32[:, :, :, ::1], numba.float32[:, ::1], numba.float32[:, ::1], numba.boolean,
                       numba.float32[:, :, ::1], numba.float32[:, ::1], numba.int64[::1], numba.float64[::1],
                       numba.int64[::1]), cache=True, nogil=True, parallel=True, fastmath=FAST)
def pool_linear_cross_entropy_sums(  # type: ignore[no-untyped-def]
        maps, scale, shift, relu, weights, biases, targets, loss, wrong):
    """The tail of a CNN at P points, its logits never written to memory: for a grouped convolution's sample-major
    channels-last output maps [N, H, W, P·C], per sample h(p) = relu(max over the 2×2 windows of maps[·, ·, ·, p·C +
    c], times scale[p, c], plus shift[p, c]) in channels-last order (i, j, c), logits(p) = h(p) W(p)ᵀ + b(p) with
    weights [P, classes, (H/2)·(W/2)·C] in that order and biases [P, classes], then loss[p] and wrong[p] as
    `cross_entropy_sums` of the logits against targets [N] (`conv_metrics.py`). Samples outer, points inner: each
    sample's map is read once, in order, while every point pools its channels (runs over C) into cache and dots them
    with its weights' rows; the logits of a block of TAIL_ROWS samples go class-major to `_class_major_cross_entropy`.
    Blocks run in parallel (numba threads), their sums added in block order. NaN propagates through the max and ReLU."""
    samples, height, width, point_channels = maps.shape
    points, channels = scale.shape
    pooled_height, pooled_width = height // 2, width // 2
    features = channels * pooled_height * pooled_width
    classes = weights.shape[1]
    row = width * point_channels
    flat = maps.reshape(samples, height * row)
    zero = np.float32(0.0)
    blocks = (samples + TAIL_ROWS - 1) // TAIL_ROWS
    block_loss = np.zeros((blocks, points), np.float64)
    block_wrong = np.zeros((blocks, points), np.int64)
    for block in numba.prange(blocks):
        start = block * TAIL_ROWS
        count = min(TAIL_ROWS, samples - start)
        h = np.empty(features, np.float32)
        logits = np.empty((points, classes, TAIL_ROWS), np.float32)
        scratch = np.empty((6, TAIL_ROWS), np.float32)
        for r in range(count):
            sample = flat[start + r]
            for p in range(points):
                point_scale, point_shift, point_weights = scale[p], shift[p], weights[p]
                for i in range(pooled_height):
                    for j in range(pooled_width):
                        top = (2 * i * width + 2 * j) * point_channels + p * channels  # the window's top left
                        a = sample[top:top + channels]
                        b = sample[top + point_channels:top + point_channels + channels]
                        d = sample[top + row:top + row + channels]
                        e = sample[top + row + point_channels:top + row + point_channels + channels]
                        pooled = h[(i * pooled_width + j) * channels:(i * pooled_width + j + 1) * channels]
                        for c in range(channels):
                            y = _max(_max(e[c], d[c]), _max(b[c], a[c])) * point_scale[c] + point_shift[c]
                            pooled[c] = y if not relu or not y < 0 else zero
                for k in range(classes):
                    w = point_weights[k]
                    acc = np.float32(0.0)
                    for f in range(features):
                        acc += w[f] * h[f]
                    logits[p, k, r] = acc + biases[p, k]
        for p in range(points):
            block_loss[block, p], block_wrong[block, p] = _class_major_cross_entropy(
                logits[p], count, targets[start:start + count], scratch)
    for p in range(points):
        total = 0.0
        misses = 0
        for block in range(blocks):
            total += block_loss[block, p]
            misses += block_wrong[block, p]
        loss[p] = total
        wrong[p] = misses

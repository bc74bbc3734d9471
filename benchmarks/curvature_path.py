"""Curvature along a path, batched against the per-point loop: the top Hessian eigenvalue at 25 points of the
straight line between two models over all 1,797 digits, on one thread: the B1 MLP (64-32-32-10, 3.5k
parameters) and the B2 MLP (64-512-512-10, 300k parameters).

Both paths run the same number of Lanczos steps (`STEPS`, tol=0 so that none stops early) from the same start
vectors; the ratio is per Hessian-vector product over the whole data. `python -m benchmarks.curvature_path`.
"""
from __future__ import annotations

import time

import torch

from modeconn_fast import curvature
from modeconn_fast.digits import load_digits_split, mlp, one_thread, train_classifier

B2_WIDTHS = (64, 512, 512, 10)
B1_WIDTHS = (64, 32, 32, 10)
POINTS = 25
STEPS = 8


def main() -> None:
    for name, widths in (("B1 MLP 64-32-32-10", B1_WIDTHS), ("B2 MLP 64-512-512-10", B2_WIDTHS)):
        print(name)
        measure(widths)


def measure(widths: tuple[int, ...]) -> None:
    digits = load_digits_split()
    data = tuple(torch.cat([a, b]) for a, b in zip(digits.train, digits.test))
    models = [train_classifier(mlp(widths, seed=seed), digits.train, epochs=5, seed=seed, progress=False)
              for seed in (0, 1)]
    t = torch.linspace(0, 1, POINTS)
    coeffs = torch.stack([1 - t, t], dim=1)
    times, results = {}, {}
    with one_thread():
        for batched in (True, False):
            start = time.perf_counter()
            with torch.no_grad():  # the products record their own graphs
                results[batched] = curvature(models[0], models, coeffs, data, iterations=STEPS, tol=1e-300,
                                             batched=batched, progress=False)
            times[batched] = time.perf_counter() - start
    difference = float(((results[True].top - results[False].top).abs() / results[False].top.abs()).max())
    passes = POINTS * STEPS
    print(f"{POINTS} points × {STEPS} Lanczos steps over {len(data[1]):,} samples, one thread")
    print(f"batched:   {times[True]:7.2f} s  ({times[True] / passes * 1e3:6.1f} ms per point and product)")
    print(f"per point: {times[False]:7.2f} s  ({times[False] / passes * 1e3:6.1f} ms per point and product)")
    print(f"ratio {times[False] / times[True]:.2f}×; top eigenvalues agree to {difference:.1e} (relative)")
    print("top eigenvalue along t:", [round(float(v), 3) for v in results[True].top])


if __name__ == "__main__":
    main()

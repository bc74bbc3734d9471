"""`scan`: values against a plain per-point loop, grid orientation, storage (resume, mismatch, damaged chunks),
the saved file, bad input."""
from __future__ import annotations

import copy
import importlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SmallCNN, assert_same_loss_and_error, mlp, plain_loop, seeded, settle_batchnorm
from modeconn_fast import GridResult, Line, Plane, scan
from modeconn_fast.scans import ScanMismatchError

scan_module = importlib.import_module("modeconn_fast.scans.scan")  # the module, not the function it exports


def _basis_models(model: nn.Module, plane) -> list[nn.Module]:
    """The plane's basis members as models, for the plain loop."""
    members = []
    for k in range(plane.basis.size):
        member = copy.deepcopy(model)
        member.load_state_dict({n: t[k] for n, t in plane.basis.stacked.items()} | plane.basis.constants)
        members.append(member)
    return members


@pytest.fixture(scope="module")
def models():
    return [seeded(mlp, s) for s in range(3)]


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(30, 19, generator=generator), torch.randint(0, 5, (30,), generator=generator)


def test_scan_equals_a_plain_loop_in_the_stored_orientation(models, data):
    plane = Plane.through(*models)
    xs, ys = np.linspace(-1, 7, 5), np.array([-2.0, 0.5, 3.0])  # non-square: 3 rows of y, 5 columns of x
    result = scan(plane, models[0], data, xs=xs, ys=ys, chunk_points=4, progress=False)
    assert result.loss.shape == (3, 5) and result["error"].shape == (3, 5)
    coords = torch.tensor([[x, y] for y in ys for x in xs])  # row j of the result is ys[j]
    expected = plain_loop(models[0], _basis_models(models[0], plane), plane.rows(coords).float(), [data])
    assert_same_loss_and_error({k: torch.from_numpy(v).flatten() for k, v in result.values.items()}, expected)
    assert result.bn_mode == "none" and result.timings["chunks"] == 4 and result.timings["chunks_computed"] == 4
    assert result.subspace["variant"] == "through" and result.data["tensors"][0] == "(30, 19) float32"


def test_a_line_gives_one_value_per_x_and_batches_may_come_from_a_generator(models, data):
    line = Line.through(models[0], models[1])
    batches = ((data[0][i:i + 8], data[1][i:i + 8]) for i in range(0, 30, 8))  # read by the fingerprint and the scan
    result = scan(line, models[0], batches, xs=[0.0, 0.5, 1.0], metrics=("loss",), chunk_points=2, progress=False)
    assert result.loss.shape == (3,) and result.y is None and result.metrics == ("loss",)
    expected = plain_loop(models[0], models[:2], torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]), [data])
    torch.testing.assert_close(torch.from_numpy(result.loss), expected["loss"], rtol=1e-5, atol=1e-7)


def test_batchnorm_recomputed_per_point_on_a_random_plane():
    x = torch.randn(32, 3, 8, 8)
    model = settle_batchnorm(seeded(SmallCNN, 0), x)
    targets = torch.randint(0, 4, (32,))
    plane = Plane.random(model, seed=1)
    xs, ys = [-0.5, 0.0, 0.5], [-0.25, 0.25]
    result = scan(plane, model, (x[:16], targets[:16]), xs=xs, ys=ys, bn_data=x[16:], chunk_points=4, progress=False)
    assert result.bn_mode == "recompute"
    coords = torch.tensor([[a, b] for b in ys for a in xs])
    expected = plain_loop(model, _basis_models(model, plane), plane.rows(coords).float(), [(x[:16], targets[:16])],
                          bn="recompute", bn_batches=[x[16:]])
    assert_same_loss_and_error({k: torch.from_numpy(v).flatten() for k, v in result.values.items()}, expected)


def test_save_and_load_open_with_numpy_alone(models, data, tmp_path):
    plane = Plane.affine(*models)
    result = scan(plane, models[0], {"train": data, "test": data}, xs=[0.0, 1.0], ys=[0.0, 0.5, 1.0], progress=False)
    result.curves["m0 → m1"] = np.array([[0.0, 0.0], [1.0, 0.0]])
    path = result.save(tmp_path / "grid.npz")
    with np.load(path, allow_pickle=False) as stored:
        assert set(stored.files) == {"x", "y", "train_loss", "train_error", "test_loss", "test_error", "curve_0", "meta"}
        assert stored["train_loss"].shape == (3, 2)
        meta = json.loads(str(stored["meta"]))
        assert meta["bn_mode"] == "none" and meta["subspace"]["marks"]["m1"] == [1.0, 0.0]
        assert meta["subspace"]["span"] == [[0.0, 1.0], [0.0, 1.0]]
    loaded = GridResult.load(path)
    np.testing.assert_array_equal(loaded.test_loss, result.test_loss)
    np.testing.assert_array_equal(loaded.curves["m0 → m1"], result.curves["m0 → m1"])
    assert loaded.version == result.version and loaded.timings == result.timings


def test_resume_reads_stored_chunks_and_recomputes_missing_or_damaged_ones(models, data, tmp_path, monkeypatch):
    plane = Plane.through(*models)
    grid = dict(xs=np.linspace(-1, 6, 4), ys=np.linspace(-1, 4, 3), chunk_points=3, progress=False)
    first = scan(plane, models[0], data, out=tmp_path, **grid)
    assert (tmp_path / "result.npz").exists()
    chunks = sorted((tmp_path / "chunks").glob("chunk_*.npz"))
    assert len(chunks) == 4
    chunks[1].unlink()  # missing
    chunks[2].write_bytes(chunks[2].read_bytes()[:50])  # truncated
    calls = []
    original = scan_module.evaluate
    monkeypatch.setattr(scan_module, "evaluate", lambda *a, **k: calls.append(1) or original(*a, **k))
    with pytest.warns(UserWarning, match="chunk_000002.npz is damaged"):
        again = scan(plane, models[0], data, out=tmp_path, **grid)
    assert len(calls) == 2 and again.timings["chunks_computed"] == 2
    for name in first.metrics:
        np.testing.assert_array_equal(again[name], first[name])
    np.testing.assert_array_equal(GridResult.load(tmp_path / "result.npz").loss, first.loss)


def test_a_scan_over_a_shuffled_loader_resumes(models, data, tmp_path):
    """The fingerprint of a DataLoader does not depend on the order of its samples; other samples change it."""
    from torch.utils.data import DataLoader, TensorDataset

    plane = Plane.through(*models)
    grid = dict(xs=np.linspace(-1, 6, 4), ys=np.linspace(-1, 4, 3), chunk_points=3, progress=False)
    loader = DataLoader(TensorDataset(*data), batch_size=7, shuffle=True)
    first = scan(plane, models[0], loader, out=tmp_path, **grid)
    (tmp_path / "result.npz").unlink()
    sorted((tmp_path / "chunks").glob("chunk_*.npz"))[-1].unlink()
    again = scan(plane, models[0], loader, out=tmp_path, **grid)
    assert again.timings["chunks_computed"] == 1
    np.testing.assert_allclose(again.loss, first.loss, rtol=1e-5)
    other = DataLoader(TensorDataset(data[0][:-1], data[1][:-1]), batch_size=7, shuffle=True)
    with pytest.raises(ScanMismatchError, match="data"):
        scan(plane, models[0], other, out=tmp_path, **grid)


def test_a_stored_scan_with_other_arguments_is_refused_naming_what_differs(models, data, tmp_path):
    plane = Plane.through(*models)
    grid = dict(xs=[0.0, 1.0], ys=[0.0, 1.0], progress=False)
    scan(plane, models[0], data, out=tmp_path, **grid)
    with pytest.raises(ScanMismatchError, match=r"out=.*holds another scan: its xs \(stored"):
        scan(plane, models[0], data, out=tmp_path, xs=[0.0, 2.0], ys=[0.0, 1.0], progress=False)
    with pytest.raises(ScanMismatchError, match="its data"):
        scan(plane, models[0], (data[0] + 1, data[1]), out=tmp_path, **grid)
    with pytest.raises(ScanMismatchError, match="its metrics"):
        scan(plane, models[0], data, out=tmp_path, metrics=("loss",), **grid)
    with pytest.raises(ScanMismatchError, match="its subspace"):
        scan(Plane.through(models[1], models[0], models[2]), models[0], data, out=tmp_path, **grid)
    fresh = scan(plane, models[0], data, out=tmp_path, resume=False, xs=[0.0, 2.0], ys=[0.0, 1.0], progress=False)
    assert fresh.timings["chunks_computed"] == 1


def test_bad_grids_and_budgets_are_named(models, data):
    plane = Plane.through(*models)
    with pytest.raises(ValueError, match="xs is empty"):
        scan(plane, models[0], data, xs=[], ys=[0.0], progress=False)
    with pytest.raises(ValueError, match=r"ys must be strictly increasing: ys\[2\] = 1 follows ys\[1\] = 2"):
        scan(plane, models[0], data, xs=[0.0], ys=[0.0, 2.0, 1.0], progress=False)
    with pytest.raises(ValueError, match="a plane needs ys"):
        scan(plane, models[0], data, xs=[0.0], progress=False)
    with pytest.raises(ValueError, match="memory_budget=1000 bytes cannot hold one point"):
        scan(plane, models[0], data, xs=[0.0], ys=[0.0], memory_budget=1000, progress=False)
    with pytest.raises(ValueError, match="chunk_points=4096 does not fit memory_budget=10000 bytes"):
        scan(plane, models[0], data, xs=np.arange(100.0), ys=np.arange(100.0), memory_budget=10_000, chunk_points=4096,
             progress=False)
    small = scan(plane, models[0], data, xs=np.arange(10.0), ys=np.arange(10.0), memory_budget=10_000, progress=False)
    assert small.timings["chunks"] > 1  # the budget made the chunks smaller
    other = nn.Sequential(nn.Linear(19, 23), nn.ReLU(), nn.Linear(23, 16), nn.Tanh(), nn.Linear(16, 5))
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(16, 23\) in the model but \(17, 23\) in the basis"):
        scan(plane, other, data, xs=[0.0], ys=[0.0], progress=False)


def test_out_must_be_a_folder(models, data, tmp_path):
    file = tmp_path / "taken"
    file.write_text("not a scan")
    with pytest.raises(ValueError, match="out=.*is a file, not a folder"):
        scan(Line.through(*models[:2]), models[0], data, xs=[0.0], out=file, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_same_scan_on_cuda_equals_the_cpu_scan(models, data):
    grid = dict(xs=np.linspace(-1, 7, 6), ys=np.linspace(-2, 5, 4), chunk_points=8, progress=False)
    on_cpu = scan(Plane.through(*models), models[0], data, **grid)
    on_gpu_models = [copy.deepcopy(m).cuda() for m in models]
    on_gpu = scan(Plane.through(*on_gpu_models), on_gpu_models[0], tuple(t.cuda() for t in data), **grid)
    np.testing.assert_allclose(on_gpu.loss, on_cpu.loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(on_gpu.error, on_cpu.error, rtol=0, atol=1 / len(data[1]) + 1e-12)

"""Training trajectories: Plane.pca against a PCA of the flattened checkpoints, exact coordinates of a planar
trajectory, TrajectoryRecorder's files, `modeconn scan --kind pca`, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SmallCNN, mlp, seeded, settle_batchnorm
from modeconn_fast import GridResult, Plane, TrajectoryRecorder, scan
from modeconn_fast.cli import main
from modeconn_fast.digits import mlp as digits_mlp


def _flat(state: dict, names) -> torch.Tensor:
    return torch.cat([state[n].double().flatten() for n in names])


def _parameters(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _direction(plane: Plane, index: int, names) -> torch.Tensor:
    return _flat({n: plane.basis.stacked[n][index] for n in names}, names)


def _trajectory(count: int, seed: int = 0) -> list[nn.Module]:
    """Checkpoints of a short SGD run of the small MLP on random data."""
    torch.manual_seed(seed)
    model = seeded(mlp, seed)
    x, y = torch.randn(64, 19), torch.randint(0, 5, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    checkpoints = []
    for _ in range(count):
        checkpoints.append(seeded(mlp, 0))
        checkpoints[-1].load_state_dict(model.state_dict())
        for _ in range(3):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return checkpoints


@pytest.mark.parametrize("center", [-1, 0, 3])
def test_pca_plane_equals_the_svd_of_the_flattened_checkpoints(center):
    checkpoints = _trajectory(7)
    plane = Plane.pca(checkpoints, center=center)
    names = _parameters(checkpoints[0])
    flat = torch.stack([_flat(m.state_dict(), names) for m in checkpoints])
    centred = flat - flat.mean(dim=0)
    _, singular, directions = torch.linalg.svd(centred, full_matrices=False)
    for j in range(2):
        ours = _direction(plane, j + 1, names)
        assert abs(float(ours @ directions[j])) == pytest.approx(1.0, abs=1e-5)  # the same up to sign
        assert float(ours.norm()) == pytest.approx(1.0, abs=1e-5)
    variance = singular**2 / (singular**2).sum()
    assert plane.explained_variance == pytest.approx(tuple(variance[:2].tolist()), rel=1e-6)
    torch.testing.assert_close(_direction(plane, 0, names), flat[center], rtol=0, atol=1e-6)
    expected = (flat - flat[center]) @ torch.stack([_direction(plane, j + 1, names) for j in range(2)]).T
    torch.testing.assert_close(plane.coordinates, expected, rtol=0, atol=1e-5)
    assert plane.coordinates.shape == (7, 2)
    assert plane.coordinates[-1, 0] >= plane.coordinates[0, 0] and plane.coordinates[-1, 1] >= plane.coordinates[0, 1]
    assert plane.describe()["variant"] == "pca" and plane.describe()["center"] == center % 7


def test_a_trajectory_in_a_plane_is_projected_exactly_buffers_included():
    x = torch.randn(16, 3, 8, 8)
    a, b, c = (settle_batchnorm(seeded(SmallCNN, s), x * (1 + s)) for s in range(3))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    weights = [(1.0, 0.0), (0.7, 0.1), (0.3, 0.5), (0.2, 0.9), (-0.1, 0.4)]  # θ = sa + p (sb − sa) + q (sc − sa)
    states = [{n: sa[n] + p * (sb[n] - sa[n]) + q * (sc[n] - sa[n]) if torch.is_floating_point(sa[n]) else sa[n]
               for n in sa} for p, q in weights]
    plane = Plane.pca(states, like=a)
    assert sum(plane.explained_variance) == pytest.approx(1.0, abs=1e-6)
    for i, state in enumerate(states):  # each checkpoint is the point at its coordinates, buffers too
        point = plane.basis.point(plane.rows(plane.coordinates[i : i + 1])[0])
        for name, tensor in state.items():
            torch.testing.assert_close(point[name], tensor, rtol=0, atol=1e-4)
    projected = plane.project(states, torch.eye(len(states), dtype=torch.float64))
    torch.testing.assert_close(projected, plane.coordinates, rtol=0, atol=1e-4)
    assert plane.marks["checkpoint 0"] == pytest.approx(tuple(plane.coordinates[0].tolist()))


def test_recorder_writes_every_nth_step_and_the_files_make_the_plane(tmp_path):
    model = seeded(mlp, 0)
    recorder = TrajectoryRecorder(model, every=3, out=tmp_path / "run")
    assert recorder.save().name == "step_000000.pt"  # the initial model
    expected = []
    for step in range(1, 11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        written = recorder.step()
        assert (written is not None) == (step % 3 == 0)
        if written is not None:
            expected.append({n: t.clone() for n, t in model.state_dict().items()})
    assert [f.name for f in recorder.files] == ["step_000000.pt", "step_000003.pt", "step_000006.pt", "step_000009.pt"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [f.name for f in recorder.files]  # no temporaries
    for path, state in zip(recorder.files[1:], expected):
        stored = torch.load(path, weights_only=True)
        for name, tensor in state.items():
            torch.testing.assert_close(stored[name], tensor, rtol=0, atol=0)
    plane = Plane.pca(recorder.files, like=model)
    assert plane.coordinates.shape == (4, 2) and set(plane.marks) == {"step_000000", "step_000009"}
    assert torch.allclose(plane.coordinates[-1], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        TrajectoryRecorder(model, out=tmp_path / "run")


def test_scan_stores_the_trajectory_with_the_result(tmp_path):
    checkpoints = _trajectory(5)
    plane = Plane.pca(checkpoints)
    x, y = torch.randn(40, 19), torch.randint(0, 5, (40,))
    (xl, xh), (yl, yh) = plane.extent()
    result = scan(plane, checkpoints[0], (x, y), xs=np.linspace(xl, xh, 4), ys=np.linspace(yl, yh, 3), progress=False)
    np.testing.assert_array_equal(result.trajectory, plane.coordinates.numpy())
    assert xl < plane.coordinates[:, 0].min() and plane.coordinates[:, 0].max() < xh  # the span holds the trajectory
    result.save(tmp_path / "grid.npz")
    loaded = GridResult.load(tmp_path / "grid.npz")
    np.testing.assert_array_equal(loaded.trajectory, result.trajectory)
    assert loaded.subspace["explained_variance"] == pytest.approx(list(plane.explained_variance))



def test_cli_scans_the_plane_of_a_trajectory_folder(tmp_path):
    model = digits_mlp(seed=0)
    recorder = TrajectoryRecorder(model, every=1, out=tmp_path / "run")
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        recorder.step()
    out = tmp_path / "scan"
    assert main(["scan", "--model", "modeconn_fast.digits:mlp", "--kind", "pca", "--trajectory", str(tmp_path / "run"),
                 "--split", "test", "--resolution", "4", "3", "--out", str(out), "--no-progress"]) == 0
    result = GridResult.load(out / "result.npz")
    assert result.loss.shape == (3, 4) and result.trajectory.shape == (4, 2)
    assert result.subspace["variant"] == "pca" and list(result.subspace["marks"]) == ["step_000001", "step_000004"]
    np.testing.assert_allclose(result.trajectory, Plane.pca(recorder.files, like=model).coordinates.numpy())
    assert main(["plot", str(out / "result.npz"), "--out", str(tmp_path / "trajectory")]) == 0
    assert (tmp_path / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_names_the_argument(tmp_path):
    checkpoints = _trajectory(3)
    with pytest.raises(ValueError, match="at least three checkpoints"):
        Plane.pca(checkpoints[:2])
    with pytest.raises(TypeError, match="list of models"):
        Plane.pca(checkpoints[0])
    with pytest.raises(ValueError, match="center must index one of the 3"):
        Plane.pca(checkpoints, center=3)
    with pytest.raises(ValueError, match="names needs one name per checkpoint"):
        Plane.pca(checkpoints, names=["a", "b"])
    with pytest.raises(ValueError, match="pass like=model"):
        Plane.pca([m.state_dict() for m in checkpoints])
    with pytest.raises(ValueError, match="does not exist"):
        Plane.pca([checkpoints[0], checkpoints[1], tmp_path / "missing.pt"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        Plane.pca([checkpoints[0], checkpoints[1], tmp_path / "list.pt"])
    a, b = (m.state_dict() for m in checkpoints[:2])
    on_a_line = [{n: a[n] + t * (b[n] - a[n]) for n in a} for t in (0.0, 0.5, 1.0, 2.0)]
    with pytest.raises(ValueError, match="lie on one line"):
        Plane.pca(on_a_line, like=checkpoints[0])
    with pytest.raises(ValueError, match="the same parameters"):
        Plane.pca([a, a, a], like=checkpoints[0])
    with pytest.raises(ValueError, match="every must be a positive integer"):
        TrajectoryRecorder(checkpoints[0], every=0, out=tmp_path / "r")
    with pytest.raises(TypeError, match="records an nn.Module"):
        TrajectoryRecorder(a, out=tmp_path / "r")


def test_cli_refuses_a_trajectory_of_two_checkpoints(tmp_path, capsys):
    recorder = TrajectoryRecorder(digits_mlp(seed=0), out=tmp_path / "run")
    recorder.save()
    recorder.step()
    with pytest.raises(SystemExit):
        main(["scan", "--model", "modeconn_fast.digits:mlp", "--kind", "pca", "--trajectory", str(tmp_path / "run"),
              "--out", str(tmp_path / "scan")])
    assert "needs at least 3 checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scan", "--model", "modeconn_fast.digits:mlp", "--kind", "through", "--trajectory", str(tmp_path / "run"),
              "--out", str(tmp_path / "scan")])
    assert "--trajectory DIR goes with --kind pca" in capsys.readouterr().err

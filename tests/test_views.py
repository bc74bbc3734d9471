"""Views of a plane's scan: the VTK file read back (values and orientation, non-square grid), the static 3-D
figure, the self-contained interactive HTML, `modeconn plot --style surface` and `--formats vtk`, bad input."""
from __future__ import annotations

import re

import numpy as np
import pytest

from modeconn_fast import GridResult
from modeconn_fast.cli import main
from modeconn_fast.views import plot_surface, surface_html


def _result(with_nan: bool = False) -> GridResult:
    """A 4 × 7 plane (ny × nx) whose values tell x from y: loss = 1 + x² + 3 y + 10, error = 0 at one point."""
    x, y = np.linspace(-1.0, 2.0, 7), np.array([0.0, 0.5, 1.5, 3.0])
    loss = 11.0 + x[None, :] ** 2 + 3 * y[:, None]
    error = np.abs(np.sin(x[None, :] + 2 * y[:, None]))
    error[0, 0] = 0.0
    if with_nan:
        loss[2, 5] = np.nan
    subspace = {"kind": "plane", "variant": "through", "marks": {"A": [0.0, 0.0], "B": [1.5, 0.0], "C": [0.5, 1.5]}}
    curve = np.stack([np.linspace(0, 1.5, 11), 1.5 * np.sin(np.linspace(0, np.pi, 11))], axis=1)
    return GridResult(x=x, y=y, values={"loss": loss, "train error": error}, bn_mode="none", subspace=subspace,
                      data=None, timings={}, version="test", curves={"Bezier curve": curve},
                      trajectory=np.array([[1.8, 2.5], [1.0, 1.0], [0.2, 0.3]]))


def _read_vtk(path) -> tuple[list[str], tuple[int, int, int], np.ndarray, dict[str, np.ndarray]]:
    """A minimal reader of the legacy ASCII structured grid: header lines, dimensions, points, point data."""
    lines = path.read_text(encoding="ascii").splitlines()
    header = lines[:4]
    dims = tuple(int(v) for v in lines[4].split()[1:])
    assert lines[4].startswith("DIMENSIONS") and lines[5].split()[0] == "POINTS"
    count = int(lines[5].split()[1])
    points = np.array([[float(v) for v in line.split()] for line in lines[6 : 6 + count]])
    assert lines[6 + count] == f"POINT_DATA {count}"
    arrays, row = {}, 7 + count
    while row < len(lines):
        kind, name, dtype, components = lines[row].split()
        assert (kind, dtype, components) == ("SCALARS", "double", "1") and lines[row + 1] == "LOOKUP_TABLE default"
        arrays[name] = np.array([float(v) for v in lines[row + 2 : row + 2 + count]])
        row += 2 + count
    return header, dims, points, arrays


@pytest.mark.parametrize("log", [False, True])
def test_vtk_reads_back_with_the_values_and_their_orientation(tmp_path, log):
    result = _result(with_nan=True)
    path = result.to_vtk(tmp_path / "plane.vtk", log=log)
    header, dims, points, arrays = _read_vtk(path)
    assert header[0] == "# vtk DataFile Version 3.0" and header[2:] == ["ASCII", "DATASET STRUCTURED_GRID"]
    assert dims == (7, 4, 1)  # nx, ny, 1: x runs fastest
    grid = points.reshape(4, 7, 3)  # [ny, nx, xyz]
    np.testing.assert_array_equal(grid[..., 0], np.broadcast_to(result.x[None, :], (4, 7)))
    np.testing.assert_array_equal(grid[..., 1], np.broadcast_to(result.y[:, None], (4, 7)))
    loss = result.loss.copy()
    finite = np.isfinite(loss)
    expected_z = np.log10(loss) if log else loss
    np.testing.assert_allclose(grid[..., 2][finite], expected_z[finite], rtol=1e-15)
    assert grid[2, 5, 2] == pytest.approx(np.nanmax(expected_z))  # the NaN point, at the largest finite height
    np.testing.assert_array_equal(arrays["loss"].reshape(4, 7)[finite], loss[finite])
    np.testing.assert_array_equal(arrays["train_error"].reshape(4, 7), result["train error"])
    np.testing.assert_array_equal(arrays["finite"].reshape(4, 7), finite.astype(float))
    assert not list(tmp_path.glob(".*tmp*"))


def test_vtk_log_height_of_a_metric_with_zeros_is_clipped(tmp_path):
    result = _result()
    _, _, points, _ = _read_vtk(result.to_vtk(tmp_path / "error.vtk", metric="train error", log=True))
    error = result["train error"]
    floor = max(error[error > 0].min(), 1e-4 * error.max())
    assert points[0, 2] == pytest.approx(np.log10(floor))
    np.testing.assert_allclose(points[1:, 2], np.log10(np.clip(error.ravel()[1:], floor, None)), rtol=1e-12)


def test_surface_figure_and_self_contained_html(tmp_path):
    result = _result(with_nan=True)
    png = plot_surface(result, tmp_path / "surface.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = surface_html(result, tmp_path / "surface.html").read_text(encoding="utf-8")
    assert re.search(r"plotly\.js v\d+\.\d+", page)  # the bundle's own header: plotly.js is inside the page
    assert len(page) > 1_000_000  # all of it (several MB)
    sources = re.findall(r"<script[^>]*\bsrc\s*=\s*[\"']?([^\"' >]+)", page)
    assert not [s for s in sources if s.startswith(("http:", "https:", "//"))], sources
    assert not re.search(r"<link[^>]+href=[\"']?(https?:)?//", page)
    for name in ("Bezier curve", "training trajectory", "models", '"A"', "surface"):
        assert name in page


def test_cli_plot_surface_and_vtk(tmp_path, capsys):
    stored = _result().save(tmp_path / "result.npz")
    assert main(["plot", str(stored), "--style", "surface"]) == 0
    assert (tmp_path / "result_loss_surface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plotly.newPlot" in (tmp_path / "result_loss_surface.html").read_text(encoding="utf-8")
    assert main(["plot", str(stored), "--style", "surface", "--formats", "html", "vtk", "--z-scale", "linear",
                 "--out", str(tmp_path / "view")]) == 0
    assert (tmp_path / "view.html").exists() and not (tmp_path / "view.png").exists()
    _, dims, points, _ = _read_vtk(tmp_path / "view.vtk")
    assert dims == (7, 4, 1) and points[:, 2].max() == pytest.approx(np.nanmax(_result().loss))
    with pytest.raises(SystemExit):
        main(["plot", str(stored), "--style", "contour", "--formats", "html"])
    assert "html" in capsys.readouterr().err


def test_views_refuse_a_line(tmp_path):
    line = GridResult(x=np.linspace(0, 1, 5), y=None, values={"loss": np.ones(5)}, bn_mode="none",
                      subspace={"kind": "line"}, data=None, timings={}, version="test")
    with pytest.raises(ValueError, match="this is a line's"):
        line.to_vtk(tmp_path / "line.vtk")
    with pytest.raises(ValueError, match="this is a line's"):
        surface_html(line, tmp_path / "line.html")
    with pytest.raises(KeyError, match="no metric 'accuracy'"):
        _result().to_vtk(tmp_path / "plane.vtk", metric="accuracy")


def test_cli_refuses_a_surface_of_a_line(tmp_path, capsys):
    line = GridResult(x=np.linspace(0, 1, 5), y=None, values={"loss": np.ones(5)}, bn_mode="none",
                      subspace={"kind": "line"}, data=None, timings={}, version="test")
    stored = line.save(tmp_path / "line.npz")
    with pytest.raises(SystemExit):
        main(["plot", str(stored), "--style", "surface"])
    assert "--style surface needs a plane's scan" in capsys.readouterr().err

"""The command line's demo writes its report with the barrier table and the picture."""
from __future__ import annotations

import subprocess
import sys

from modeconn_fast.cli import main


def test_demo_writes_report_and_plot(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2", "--no-progress"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| train |" in report and "| test |" in report and "loss barrier" in report
    assert "BatchNorm: none" in report
    picture = tmp_path / "linear_path.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Re-Basin" in report and "loss barrier after" in report
    assert (tmp_path / "rebasin_path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Bezier curve" in report and "max on the line" in report
    assert (tmp_path / "curve_path.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Fast Geometric Ensembling" in report and "| **FGE ensemble**" in report and "ECE (15 bins)" in report
    assert (tmp_path / "fge_calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "The plane through the curve" in report and "| θ_1 | (" in report and "BatchNorm: none" in report
    assert (tmp_path / "plane_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plane_scan.npz").exists()
    assert "Sharpness along the line and the curve" in report and "| Bezier curve |" in report
    assert (tmp_path / "sharpness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "The plane as a surface" in report and "](plane_surface.html)" in report
    assert (tmp_path / "plane_surface.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plotly.newPlot" in (tmp_path / "plane_surface.html").read_text(encoding="utf-8")


def test_module_entry_point_shows_help():
    done = subprocess.run([sys.executable, "-m", "modeconn_fast", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "demo" in done.stdout

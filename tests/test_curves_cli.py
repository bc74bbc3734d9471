"""`modeconn curve` on the bundled digits, as a user runs it, and the control point it writes fed to `modeconn scan`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modeconn_fast.cli import main
from modeconn_fast.digits import load_digits_split, mlp, train_classifier


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("curve_checkpoints")
    digits = load_digits_split()
    paths = []
    for name, seed in (("A", 0), ("B", 1)):
        model = train_classifier(mlp((64, 32, 10), seed=seed), digits.train, epochs=5, seed=seed, progress=False)
        paths.append(str(folder / f"{name}.pt"))
        torch.save(model.state_dict(), paths[-1])
    return paths


def small_mlp():
    return mlp((64, 32, 10))


def test_curve_command_trains_and_writes_the_curve(checkpoints, tmp_path, capsys):
    out = tmp_path / "curve"
    assert main(["curve", "--model", "tests.test_curves_cli:small_mlp", "--checkpoint", *checkpoints, "--epochs", "3",
                 "--points", "9", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train loss barrier: straight line" in printed and "test_error" in printed
    with np.load(out / "profile.npz") as stored:
        meta = json.loads(str(stored["meta"]))
        assert stored["t"].shape == (9,) and stored["curve_train_loss"].shape == (9,)
        assert stored["line_test_error"].shape == (9,)
    assert meta["kind"] == "bezier" and len(meta["epoch_loss"]) == 3 and set(meta["summary"]) >= {"train_loss"}
    assert (out / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "curve.pt", weights_only=True)
    assert "control_points.1.0.weight" in state
    middle = torch.load(out / "control_point_1.pt", weights_only=True)
    torch.testing.assert_close(middle["0.weight"], state["control_points.1.0.weight"])
    scan_out = tmp_path / "plane"
    assert main(["scan", "--model", "tests.test_curves_cli:small_mlp", "--checkpoint", checkpoints[0],
                 str(out / "control_point_1.pt"), checkpoints[1], "--resolution", "4", "--out", str(scan_out),
                 "--no-progress"]) == 0
    with np.load(scan_out / "result.npz") as stored:
        assert stored["loss"].shape == (4, 4)


def test_curve_command_refuses_bad_input(checkpoints, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["curve", "--model", "tests.test_curves_cli:small_mlp", "--checkpoint", *checkpoints, "--bends", "0",
              "--out", str(tmp_path), "--no-progress"])
    assert "bends" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["curve", "--model", "modeconn_fast.digits:mlp", "--checkpoint", *checkpoints, "--out", str(tmp_path),
              "--no-progress"])
    assert "shape" in capsys.readouterr().err

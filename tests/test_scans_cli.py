"""`modeconn scan` then `modeconn plot` on the bundled digits, as a user runs them; their errors and help."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modeconn_fast.cli import build_parser, main
from modeconn_fast.digits import mlp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for name, seed in (("A", 0), ("C", 2), ("B", 1)):
        paths.append(folder / f"{name}.pt")
        torch.save(mlp(seed=seed).state_dict(), paths[-1])
    torch.save(mlp((64, 32, 10), seed=0).state_dict(), folder / "other.pt")
    return folder, [str(p) for p in paths]


def _modeconn(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modeconn_fast", *args], capture_output=True, text=True, timeout=300)


def test_scan_then_plot_write_the_pictures(checkpoints, tmp_path):
    _, paths = checkpoints
    out = tmp_path / "scan"
    done = _modeconn("scan", "--model", "modeconn_fast.digits:mlp", "--checkpoint", *paths, "--data", "digits",
                     "--split", "test", "--resolution", "5", "4", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    with np.load(out / "result.npz") as stored:
        assert stored["loss"].shape == (4, 5) and stored["curve_0"].shape == (101, 2)
        meta = json.loads(str(stored["meta"]))
    assert list(meta["subspace"]["marks"]) == ["A", "C", "B"] and meta["curves"] == ["straight line A → B"]
    assert meta["data"]["tensors"][0] == "(449, 64) float32"
    done = _modeconn("plot", str(out / "result.npz"), "--formats", "png", "pdf", "--out", str(tmp_path / "plane"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plane.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plane.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_line_scan_and_its_profile(checkpoints, tmp_path):
    _, paths = checkpoints
    assert main(["scan", "--model", "modeconn_fast.digits:mlp", "--checkpoint", paths[0], "--kind", "random-line",
                 "--normalization", "layer", "--seed", "3", "--split", "test", "--resolution", "6",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["plot", str(tmp_path / "result.npz"), "--metric", "error"]) == 0
    assert (tmp_path / "result_error_profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_checkpoint_of_another_architecture_is_named(checkpoints, tmp_path, capsys):
    folder, paths = checkpoints
    with pytest.raises(SystemExit):
        main(["scan", "--model", "modeconn_fast.digits:mlp", "--checkpoint", paths[0], str(folder / "other.pt"),
              paths[2], "--out", str(tmp_path), "--no-progress"])
    assert "other.pt: parameter '0.weight' has shape (32, 64) there but (128, 64) in the model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scan", "--model", "modeconn_fast.digits:mlp", "--checkpoint", *paths[:2], "--out", str(tmp_path)])
    assert "--kind through takes 3 checkpoints (--checkpoint), got 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scan", "--model", "modeconn_fast.digits", "--checkpoint", paths[0], "--kind", "random", "--out",
              str(tmp_path)])
    assert "--model must be module:factory" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("scan", "plot"):
        with pytest.raises(SystemExit) as exit_code:
            main([command, "--help"])
        assert exit_code.value.code == 0
        text = capsys.readouterr().out
        for action in commands[command]._actions:
            assert action.help and len(action.help.split()) >= 3, f"{command} {action.option_strings}"
            assert all(option in text for option in action.option_strings)

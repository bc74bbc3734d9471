"""A scan's folder: a manifest and one file per finished chunk, each written atomically.

    out/manifest.json                 {"format", "fingerprint", "points", "chunk_points", "chunks", "metrics"}
    out/chunks/chunk_000042.npz       one array per metric for the chunk's points, its index, its seconds,
                                      the BatchNorm mode, the rank that wrote it and a SHA-256 checksum
    out/result.npz                    the assembled `GridResult`, once every chunk is done

Every file is written to a temporary name in the same folder and renamed (`os.replace`), so a process killed
at any moment leaves either the whole file or none. A chunk file that cannot be read or whose checksum fails
is reported and computed again.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_atomically

FORMAT = "modeconn_fast.scan/1"
MANIFEST = "manifest.json"
CHUNKS = "chunks"
RESULT = "result.npz"


class ScanMismatchError(ValueError):
    """The out folder holds a scan made with other arguments."""


def _checksum(values: dict[str, np.ndarray], index: int) -> str:
    digest = hashlib.sha256(str(index).encode())
    for name in sorted(values):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values[name], dtype=np.float64).tobytes())
    return digest.hexdigest()


class ScanStore:
    """The folder of one scan. `open` checks or creates its manifest; chunk files are read and written by index."""

    def __init__(self, folder: Path, manifest: dict[str, Any]):
        self.folder = folder
        self.manifest = manifest

    @classmethod
    def open(cls, out: str | Path, manifest: dict[str, Any], *, resume: bool) -> "ScanStore":
        """Use `out` for the scan described by `manifest`. An existing manifest must match (resume=True) or is
        replaced together with its chunks (resume=False)."""
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"out={str(out)!r} is a file, not a folder")
        stored_path = folder / MANIFEST
        manifest = json.loads(json.dumps({"format": FORMAT, **manifest}))  # as it reads back from the file
        if stored_path.exists():
            stored = _read_manifest(stored_path, out)
            if resume:
                _check_same(stored, manifest, out)
            else:
                shutil.rmtree(folder / CHUNKS, ignore_errors=True)
                (folder / RESULT).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CHUNKS).mkdir(exist_ok=True)
        for leftover in [*folder.glob(f"{CHUNKS}/.chunk_*.tmp-*"), *folder.glob(".*.tmp-*")]:  # a killed process's
            leftover.unlink(missing_ok=True)
        if not stored_path.exists() or not resume:
            write_atomically(stored_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        return cls(folder, manifest)

    @classmethod
    def attach(cls, out: str | Path, manifest: dict[str, Any]) -> "ScanStore":
        """The folder another process (rank 0 of a torchrun job) has already opened with `open`."""
        folder = Path(out)
        (folder / CHUNKS).mkdir(parents=True, exist_ok=True)
        return cls(folder, json.loads(json.dumps({"format": FORMAT, **manifest})))

    def chunk_path(self, index: int) -> Path:
        return self.folder / CHUNKS / f"chunk_{index:06d}.npz"

    @property
    def result_path(self) -> Path:
        return self.folder / RESULT

    def write_chunk(self, index: int, values: dict[str, np.ndarray], seconds: float, bn_mode: str, rank: int = 0) -> None:
        arrays = {f"metric_{name}": np.asarray(v, dtype=np.float64) for name, v in values.items()}
        checksum = _checksum(values, index)

        def write(file: Any) -> None:
            np.savez(file, index=np.array(index), seconds=np.array(seconds), bn_mode=np.array(bn_mode),
                     rank=np.array(rank), checksum=np.array(checksum), **arrays)

        write_atomically(self.chunk_path(index), write)

    def read_chunk(self, index: int, points: int) -> tuple[dict[str, np.ndarray], float, str] | None:
        """(values, seconds, bn_mode) of a finished chunk; None when it is missing or damaged (then removed)."""
        path = self.chunk_path(index)
        if not path.exists():
            return None
        metrics = self.manifest["metrics"]
        try:
            with np.load(path, allow_pickle=False) as stored:
                values = {name: stored[f"metric_{name}"] for name in metrics}
                intact = (int(stored["index"]) == index and all(v.shape == (points,) for v in values.values())
                          and str(stored["checksum"]) == _checksum(values, index))
                seconds, bn_mode = float(stored["seconds"]), str(stored["bn_mode"])
        except Exception as error:  # noqa: BLE001 - truncated zip, missing key, bad header: all mean "damaged"
            intact, reason = False, f"{type(error).__name__}: {error}"
        else:
            reason = "its checksum or shape does not match"
        if not intact:
            warnings.warn(f"chunk file {path} is damaged ({reason}): computing chunk {index} again", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        return values, seconds, bn_mode


def _read_manifest(path: Path, out: str | Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ScanMismatchError(f"out={str(out)!r} has an unreadable {MANIFEST} ({error}): choose another out "
                                "folder, or pass resume=False to start the scan there afresh") from error
    if stored.get("format") != FORMAT:
        raise ScanMismatchError(f"out={str(out)!r} holds a {MANIFEST} of format {stored.get('format')!r}, not a scan "
                                f"of this version ({FORMAT}): choose another out folder")
    return stored


def _check_same(stored: dict[str, Any], manifest: dict[str, Any], out: str | Path) -> None:
    differ = []
    fields = sorted(set(stored["fingerprint"]) | set(manifest["fingerprint"]))
    for name in fields:
        before, now = stored["fingerprint"].get(name), manifest["fingerprint"].get(name)
        if before != now:
            differ.append(f"{name} (stored {_short(before)}, now {_short(now)})")
    if differ:
        raise ScanMismatchError(f"out={str(out)!r} holds another scan: its " + "; ".join(differ)
                                + ". Pass another out folder, the same arguments to resume it, or resume=False to "
                                "replace it")


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."

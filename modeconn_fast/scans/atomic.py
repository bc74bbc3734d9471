"""Files written atomically: a hidden temporary file beside the target, flushed to disk, then renamed over it,
so that a reader (or a resumed scan) sees the old file or the whole new one, never a part."""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable


def write_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(file)` on a temporary file, fsync it, and rename it to `path`; returns `path`."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return path

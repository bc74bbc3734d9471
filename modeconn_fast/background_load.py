"""Compiled (numba) code imported in a background thread, so that a process never waits for it.

Importing numba and reading compiled code from its on-disk cache costs a new process about a second of a core
(many seconds if the cache is empty: `make` fills it at install). A `BackgroundLoad` runs such an import in a
thread while its callers go on with their fallback (scipy's LAP, torch's paths) until `module()` returns it. The
thread is not a daemon: a process that ends during the load waits for it (numba stopped midway aborts the
interpreter with exit status 134). Used by `rebasin/lap_loading.py` and `engine/compiled_cpu.py`.
"""
from __future__ import annotations

import threading
from types import ModuleType
from typing import Callable


class BackgroundLoad:
    """`load()` (an import returning the module) run once per process in a thread named `name`."""

    def __init__(self, load: Callable[[], ModuleType], name: str):
        self._load, self._name = load, name
        self._ready = threading.Event()  # finished, or failed (the thread then prints the error)
        self._starting = threading.Lock()
        self._thread: threading.Thread | None = None
        self._module: ModuleType | None = None

    def start(self) -> None:
        """Start the load (once; later calls return at once)."""
        with self._starting:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name)
                self._thread.start()

    @property
    def ready(self) -> bool:
        """Whether the load has finished (successfully or not)."""
        return self._ready.is_set()

    def module(self) -> ModuleType | None:
        """The loaded module, or None while loading, before the start, or after a failed load."""
        return self._module

    def wait(self) -> ModuleType | None:
        """Start the load if needed and block until it has finished; the module, or None if it failed."""
        self.start()
        self._ready.wait()
        return self._module

    def _run(self) -> None:
        try:
            self._module = self._load()
        finally:
            self._ready.set()

"""Handing memory the process has freed back to the operating system."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Returns freed heap memory to the OS with glibc's ``malloc_trim``; does nothing without glibc.

    Compiling a train step frees a few hundred MB that glibc keeps on its heap, and the state and
    step buffers allocated afterwards are fresh ``mmap``s that do not reuse it: without this, that
    memory stays resident for the whole run (docs/performance.md §6).
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, musl, Windows)
        return
    trim(0)

"""The host process's memory allocator, for XLA:CPU's per-step buffers (opt-in).

XLA:CPU allocates each execution's temporary buffers with `malloc` and frees them when it
returns. Under glibc's defaults those blocks live in mmap'd memory that goes back to the system
when freed (a large block's own mapping, or a worker thread's arena heap, unmapped once empty),
so every training step touches its buffers' pages for the first time again: CLIP's step at
batch 128 page-faulted 143,000 times (560 MB) a step, 0.5-0.9 s of kernel time per step over the
two cores of a 2-core VM (benchmarks/RESULTS.md, session 16).

`keep_freed_memory()` keeps that memory in the process: one arena, no `mmap` for large blocks,
no trimming of the heap's top, so the next step reuses the last step's pages. The one arena is
shared by every thread, and that costs where many threads allocate at once: measured on the
2-core VM, CLIP's training step ran 1.1-2x faster (in every paired run), the
diffusion prior's faster in three of four, the GAN decoder's 15-25% slower, the U-Net's within
noise. So it is off unless asked for: `DALLE_JAX_MALLOC=keep` in the environment makes the command lines (train.py, sample.py,
the evaluation command) and the benchmarks call it first thing, through `from_environment()`;
a program that imports dalle_jax may call `keep_freed_memory()` itself.

The process then holds on to its peak heap until it exits. It does nothing where the C library
is not glibc (macOS, musl), and changes no accelerator's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# (mallopt parameter from glibc's <malloc.h>, the same setting's environment variable, value):
# one arena, no mmap for large blocks, no trimming of the heap's top. The variables are read when
# a process starts: they give the settings to a process this one launches (a benchmark's peer).
SETTINGS = ((-8, "MALLOC_ARENA_MAX", 1), (-4, "MALLOC_MMAP_MAX_", 0),
            (-1, "MALLOC_TRIM_THRESHOLD_", 2 ** 31 - 1))
ENVIRONMENT = {name: str(value) for _, name, value in SETTINGS}
VARIABLE = "DALLE_JAX_MALLOC"  # "keep" turns keep_freed_memory on in the command lines

_kept = False


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Keeps freed memory in the process (see the module's docstring); True where the settings
    took effect. Call it before the first large computation; calling it again does nothing."""
    global _kept
    if not _kept:
        libc = _glibc()
        if libc is not None:
            # mallopt returns 1 on success
            _kept = all(libc.mallopt(param, value) == 1 for param, _, value in SETTINGS)
    return _kept


def from_environment() -> bool:
    """`keep_freed_memory()` if DALLE_JAX_MALLOC=keep, else nothing; True where it is on."""
    if os.environ.get(VARIABLE, "").strip().lower() == "keep":
        return keep_freed_memory()
    return _kept


def kept() -> bool:
    return _kept

"""The coordinator's native heap (glibc malloc), kept from creeping up over a long run.

The coordinator serves for weeks and allocates from gRPC's threads and the to_thread
pool. Under churn (bench/chaos.py --churn-minutes 10) its resident size grew 10–11% in
10 minutes while the Python heap and malloc's bytes in use stayed flat: the growth was
free memory that glibc kept. Two of its defaults cause that. Each thread that allocates
may get an arena of its own (up to 8 per core), and free space in one arena serves no
other. And the threshold above which an allocation gets its own mapping (returned to
the OS on free) rises to the size of any such block freed, up to 32 MiB, so message and
checkpoint buffers end up in the arenas, fragmenting them. Both are fixed here, once, at
start; after each commit the free pages are handed back. Elsewhere than glibc (musl,
macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("starling.coordinator")

# mallopt parameters (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed (no dynamic rise)
ARENAS = 2


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both or neither)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def configure_heap() -> bool:
    """At most ARENAS malloc arenas, and a fixed mmap threshold; call before threads
    start. False where malloc is not glibc's (or refused a setting)."""
    if _LIBC is None:
        return False
    applied = bool(_LIBC.mallopt(_M_ARENA_MAX, ARENAS))
    applied &= bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not applied:
        log.warning("malloc refused the heap settings: memory may creep up")
    return applied


def release_free_heap() -> None:
    """Hands the free pages of every malloc arena back to the OS (malloc_trim; well
    under a millisecond on this heap)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

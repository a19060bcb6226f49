"""Host arrays on transparent huge pages: what the numba backend's layers, weights and optimiser
state are allocated from.

A step touches about 100 MB of arrays; on 4 KiB pages that is ~25,000 pages, far beyond the
TLB, so every kernel's first pass over an array pays page walks. Carved out of 2 MiB-aligned
anonymous regions advised with MADV_HUGEPAGE (Linux), the same arrays span ~50 pages and the
batch-512 bf16 step runs about 15 % faster (bench/step_time.py). Small arrays are packed into
shared chunks, large ones get a region each. Memory is never reused: a chunk is unmapped when
the last array carved from it is freed (2, 8 and 32 MiB chunks measured the same step time).
Where the OS has no MADV_HUGEPAGE (macOS, Windows) or FASTVAE_HUGE_PAGES=off, arrays are plain
`np.empty` ones.
"""
import ctypes
import mmap
import os
import threading

import numpy as np

HUGE_PAGE = 2 << 20
CHUNK = 2 << 20      # bytes of one shared region for small arrays: one huge page, so a chunk
                     # that one live array keeps mapped holds at most 2 MiB
ALIGN = 64           # bytes: a cache line, and a multiple of every dtype's size


def supported():
    """Whether arrays here come from huge-page regions (Linux's MADV_HUGEPAGE, not switched off)."""
    if os.environ.get("FASTVAE_HUGE_PAGES", "").lower() in ("0", "off", "no", "false"):
        return False
    return hasattr(mmap, "MADV_HUGEPAGE")


def region(nbytes):
    """A zero-filled uint8 array of at least `nbytes`, 2 MiB-aligned, advised for huge pages."""
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    probe = ctypes.c_char.from_buffer(mapping)
    offset = -ctypes.addressof(probe) % HUGE_PAGE
    del probe  # a live export would keep the mapping from being closed when its arrays die
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, size)
    return np.frombuffer(mapping, np.uint8, size, offset)


class Arena:
    """Hands out C-contiguous arrays carved from huge-page regions, 64-byte aligned."""

    def __init__(self, chunk=CHUNK):
        self.chunk = chunk
        self._current, self._used = None, 0
        self._lock = threading.Lock()

    def empty(self, shape, dtype):
        """An uninitialised array (fresh memory, so in fact zero-filled)."""
        dtype = np.dtype(dtype)
        shape = (shape,) if np.ndim(shape) == 0 else tuple(shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes == 0 or not supported():
            return np.empty(shape, dtype)
        if nbytes > self.chunk // 4:
            return region(nbytes)[:nbytes].view(dtype).reshape(shape)
        with self._lock:
            start = -(-self._used // ALIGN) * ALIGN
            if self._current is None or start + nbytes > self._current.size:
                self._current, start = region(self.chunk), 0
            self._used = start + nbytes
            memory = self._current[start:start + nbytes]
        return memory.view(dtype).reshape(shape)

    def zeros(self, shape, dtype):
        array = self.empty(shape, dtype)
        array.fill(0)
        return array


ARENA = Arena()
empty, zeros = ARENA.empty, ARENA.zeros

"""Host memory that a training step frees is kept for the next step (glibc only).

PyTorch allocates CPU tensors with `posix_memalign`, and glibc returns freed memory to
the kernel in two ways: a block above its mmap threshold (128 KiB at first, raised as
blocks are freed, at most 32 MiB) gets pages of its own and gives them back when freed,
and the heap's top is trimmed whenever more than the trim threshold lies free there. A
training step allocates and frees its activations, logits and gradients again and
again, in sizes that change with every batch, so each step asked the kernel for fresh
pages, each faulted in and zeroed on first touch. On 2 CPU cores with the 0.5B model
that was 210,000 to 490,000 minor page faults and about 1.8 s of system time a step,
most of them in the update (`docs/benchmarks.md`, "Freed memory kept"). Told to map
nothing on its own and to trim only when 2 GiB lie free at the top, glibc keeps what
was freed in its heap and cuts later blocks from it. (A block of exactly a freed one's
size may still not fit it: `posix_memalign` asks a little more than the block holds.)

The cost is that the process holds on to its peak, as PyTorch's CUDA allocator does
with GPU memory: memory freed after the largest step is not returned to the system
until the process ends. Other C libraries (musl, macOS) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt's parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB


def keep_freed_memory() -> bool:
    """Make glibc serve every allocation from its heap and shrink it only past 2 GiB of
    free top; True when it did. It lasts as long as the process (calling it again sets
    the same again): call it before the large allocations, whose pages it then keeps."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_MAX, 0) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        log.warning("keep_host_memory: glibc refused mallopt; freed memory goes back to the kernel")
        return False
    return True

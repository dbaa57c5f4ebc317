"""Keep glibc's allocator from handing training memory back to the kernel between steps (CPU training only).

A training step allocates and frees the same large activation buffers every step. With glibc's defaults, buffers
above a dynamic threshold are ``mmap``'ed and ``munmap``'ed each time and the top of the heap is trimmed, so every
step faults in (and zeroes) its activations again, in kernel time that is a visible share of a CPU step. Serving
every buffer from the heap and not trimming it keeps freed memory in the process for reuse, at about the same peak
memory (a little more where the heap fragments); memory freed after the peak stays with the process until it exits,
which is what a training process wants anyway. benchmarks/README.md ("Training step: against the official code
itself") has the measurements.

``mmap`` is switched off rather than given a high threshold because glibc caps that threshold at 32 MiB on 64-bit
systems, and one activation of a larger batch (the predictor's MLP at batch 64: 75 MiB) passes it. Threads other
than the main one still fall back to ``mmap`` for requests their arena cannot hold (glibc does so by itself).

The training loops apply it on CPU; set ``IJEPA_HF_MALLOC_TUNING=0`` to keep glibc's defaults (e.g. for a process
that goes on to do other work and wants freed memory returned to the system).

PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) gets the same effect by preloading jemalloc
or tcmalloc; this needs no preload and no restart, so the training loop can apply it itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

OPT_OUT_VARIABLE = "IJEPA_HF_MALLOC_TUNING"
TRIM_THRESHOLD_BYTES = 2**30
TOP_PAD_BYTES = 64 * 2**20


def keep_freed_memory_for_reuse() -> bool:
    """Tunes glibc malloc for a training process (see the module docstring). Returns whether it applied.

    Does nothing (and returns False) off glibc, e.g. on macOS or musl, or when ``IJEPA_HF_MALLOC_TUNING=0``. A
    preloaded allocator such as jemalloc makes ``mallopt`` moot (and is itself enough). Safe to call more than once.
    """
    if os.environ.get(OPT_OUT_VARIABLE, "1").strip() == "0":
        logger.debug("%s=0: glibc malloc left at its defaults.", OPT_OUT_VARIABLE)
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    settings = {
        "M_MMAP_MAX": (_M_MMAP_MAX, 0),
        "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
        "M_TOP_PAD": (_M_TOP_PAD, TOP_PAD_BYTES),
    }
    applied = all(libc.mallopt(code, value) == 1 for code, value in settings.values())
    if applied:
        logger.debug("glibc malloc tuned for training: %s", {name: value for name, (_, value) in settings.items()})
    else:
        logger.warning("mallopt refused the training allocator settings; continuing with glibc's defaults.")
    return applied

"""The training loops' glibc tuning: freed activation memory is reused instead of being faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, resource, sys, torch
from ijepa_hf.training import keep_freed_memory_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_memory_for_reuse() is True
else:
    # The control pins glibc's documented static defaults (128 KiB mmap and trim thresholds). Left alone, glibc
    # raises its thresholds after the first large free, and whether a round then faults depends on heap layout
    # (measured: ~24.5k or ~5.3k pages per round, run to run); pinned, every freed buffer goes back to the kernel.
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024) == 1
def one_round():
    # A training step in miniature: activations pile up on the heap, then all are freed at the end of backward.
    # Two are above the 32 MiB that glibc allows as an mmap threshold (the predictor's MLP at batch 64 is 75 MiB).
    live = [torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(12)]
    live += [torch.empty(48 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(2)]
    del live
def faults_per_round():
    one_round()
    faults = []
    for _ in range(7):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        one_round()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # The median: the heap may still grow once (a small allocation between rounds can split its free space), which is
    # not refaulting.
    return sorted(faults)[len(faults) // 2]
print(faults_per_round())
"""


def _faults(mode: str) -> float:
    output = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    return float(output.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_stops_refaulting_freed_buffers():
    tuned, default = _faults("tuned"), _faults("static-defaults")
    # 192 MiB written per round is ~49.2k pages. With glibc's static defaults every buffer is mmap'ed and unmapped
    # again, so each round faults it all in anew; the tuned heap keeps the freed memory and reuses it.
    assert default > 45_000, default
    assert tuned < 1_000, tuned


def test_is_a_no_op_elsewhere(monkeypatch):
    from ijepa_hf.training import cpu_allocator

    monkeypatch.setattr(cpu_allocator.platform, "system", lambda: "Darwin")
    assert cpu_allocator.keep_freed_memory_for_reuse() is False


def test_environment_variable_opts_out(monkeypatch):
    from ijepa_hf.training import cpu_allocator

    monkeypatch.setenv("IJEPA_HF_MALLOC_TUNING", "0")
    monkeypatch.setattr(cpu_allocator.ctypes, "CDLL", lambda *a, **k: pytest.fail("mallopt must not be reached"))
    assert cpu_allocator.keep_freed_memory_for_reuse() is False

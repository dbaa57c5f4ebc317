"""The training loops' glibc tuning: freed activation memory is reused instead of being faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from ijepa_hf.training import keep_freed_memory_for_reuse
if sys.argv[1] == "tuned":
    assert keep_freed_memory_for_reuse() is True
def one_round():
    # A training step in miniature: activations pile up on the heap, then all are freed at the end of backward.
    live = [torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(12)]
    del live
def faults_per_round():
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(faults_per_round())
"""


def _faults(mode: str) -> float:
    output = subprocess.run([sys.executable, "-c", SCRIPT, mode], check=True, capture_output=True, text=True)
    return float(output.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_allocator_stops_refaulting_freed_buffers():
    tuned, default = _faults("tuned"), _faults("default")
    # 96 MiB written per round is ~24.6k pages. glibc's defaults trim the freed top of the heap (above its 64 MiB
    # trim threshold) and fault it in again next round; the tuned heap keeps and reuses it.
    assert default > 20_000, default
    assert tuned < 1_000, tuned


def test_is_a_no_op_elsewhere(monkeypatch):
    from ijepa_hf.training import cpu_allocator

    monkeypatch.setattr(cpu_allocator.platform, "system", lambda: "Darwin")
    assert cpu_allocator.keep_freed_memory_for_reuse() is False

"""``benchmarks/bench_train_step.py`` end to end at toy sizes: fresh child processes for ours and the rebuilt
official step, the side-by-side table and its bookkeeping. No timings are asserted."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"
TOY = ["--image-size", "96", "--steps", "1", "--rounds", "2", "--precisions", "bf16", "--allocators", "tuned",
       "--predictor-width", "48", "--predictor-depth", "1"]


def _table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| official (rebuilt)") or line.startswith("| ijepa_hf"):
            rows[cells[0]] = cells
    return rows


def test_side_by_side_table_at_toy_sizes():
    result = subprocess.run([sys.executable, str(_SCRIPT), *TOY], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _table_rows(result.stdout)
    assert set(rows) == {"official (rebuilt)", "ijepa_hf"}
    official, ours = rows["official (rebuilt)"], rows["ijepa_hf"]
    assert official[1] == ours[1] == "bf16" and official[2] == "default" and ours[2] == "tuned"
    assert official[9].startswith("1.00x")  # the baseline against itself
    ratio, low, high = map(float, re.fullmatch(r"([\d.]+)x \(([\d.]+)-([\d.]+)\)", ours[9]).groups())
    assert 0 < low <= ratio <= high
    # Timings are reported, never asserted on (a shared machine makes any bound flaky): only that they are times.
    assert float(official[3]) > 0 and float(ours[3]) > 0
    assert ours[10] == ours[11] == "–"  # the figures belong to the default sizes only
    ours_flops = float(re.search(r"; ([\d.]+) matmul GFLOP per step", result.stdout).group(1))
    official_flops = float(re.search(r"official step does ([\d.]+) matmul GFLOP", result.stdout).group(1))
    assert official_flops > ours_flops  # its predictor's last block also updates the context rows


def test_rounds_must_be_positive():
    result = subprocess.run([sys.executable, str(_SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "expected a positive whole number, got '0'" in result.stderr


def test_lists_must_name_known_precisions_and_allocators():
    for flag, value, choices in (("--precisions", "fp32,fp16", "fp32,bf16"), ("--allocators", "", "tuned,default")):
        result = subprocess.run([sys.executable, str(_SCRIPT), flag, value], capture_output=True, text=True,
                                timeout=60)
        assert result.returncode != 0
        assert f"expected a comma-separated subset of {choices}, got {value!r}" in result.stderr

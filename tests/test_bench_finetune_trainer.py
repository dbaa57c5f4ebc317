"""``benchmarks/bench_finetune_trainer.py`` end to end at toy sizes (pretraining through ``pretrain()`` on a
Fashion-MNIST image folder, the linear probe, a ``Trainer`` fine-tune): its JSON line. No accuracy is asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune_trainer.py"
_FMNIST = Path(os.environ.get("FASHION_MNIST_DIR") or "/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not any((_FMNIST / f"t10k-labels-idx1-ubyte{suffix}").exists() for suffix in ("", ".gz")),
                    reason="Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
def test_the_trainer_fine_tune_benchmark_runs_through_the_user_path(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(_SCRIPT.parents[1])}
    proc = subprocess.run(
        [sys.executable, str(_SCRIPT), "--output", str(tmp_path), "--pretrain-steps", "3", "--pretrain-batch", "16", "--pretrain-images", "256",
         "--train-images", "64", "--test-images", "64", "--epochs", "0.5", "--modes", "full",
         "--pooler-norms", "batchnorm", "--threads", "1"],
        env=env, capture_output=True, text=True, timeout=600, cwd=_SCRIPT.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 <= result["linear_probe"] <= 1 and result["train_images"] == 64
    assert [(row["mode"], row["pooler_norm"]) for row in result["trainer"]] == [("full", "batchnorm")]
    assert (tmp_path / "pretraining" / "encoder" / "config.json").is_file()

"""Smoke test of ``benchmarks/main_job_supervised.py`` (the supervised ceiling of the main job's shape label) at toy
size: the demo's encoder trained by transformers' Trainer on a label, then the main job's own probe."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import TINY_OVERRIDES

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "main_job_supervised.py"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_supervised_encoder_goes_through_the_main_jobs_probe(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("benchmarks_main_job_supervised", _SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(script.main_job, "PROBE_TRAIN_IMAGES", 40)
    monkeypatch.setattr(script.main_job, "PROBE_TEST_IMAGES", 20)
    summary = script.main(["--output-dir", str(tmp_path), "--label", "texture", "--config_overrides", TINY_OVERRIDES,
                           "--embedded_num_images", "32", "--per_device_train_batch_size", "8",
                           "--max_train_steps", "6", "--learning_rate", "1e-3"])
    # Trainer ran the main job's steps, and the encoder it trained (not a fresh one) is the one probed.
    assert summary["trainer_log"][-1]["step"] == 6
    saved = load_file(tmp_path / "encoder" / "model.safetensors")
    torch.manual_seed(0)
    from ijepa_hf import IJepaEncoderForImageClassification, IJepaEncoderModel

    fresh = IJepaEncoderForImageClassification(IJepaEncoderModel.config_class.from_pretrained(tmp_path / "encoder"))
    changed = [k for k, v in fresh.encoder.state_dict().items() if k in saved and not torch.equal(v, saved[k])]
    assert changed, "the probed encoder is the untrained initialisation"
    rows = summary["probe"]["rows"]
    assert rows[0]["model"].startswith("supervised on texture") and rows[1]["model"].startswith("random init")
    assert rows[0]["feature_dim"] == 2 * 32  # the tiny encoder's 2 blocks, concatenated as the main job does
    for row in rows:
        assert 0.0 <= row["shape"]["linear_accuracy"] <= 1.0
    written = json.loads((tmp_path / "supervised_results.json").read_text())
    assert written["probe"]["rows"][0]["texture"] == json.loads(json.dumps(rows[0]["texture"], default=str))

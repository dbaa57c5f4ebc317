"""Faults a shared cluster brings to a long pretraining run, injected on the tiny config of test_pretraining: files
swapped between checkpoints, the output folder deleted while the run trains, a full disk during the final export,
a failed Hub push and its retry, a warm-up longer than the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_hf.training.checkpointing import (
    LOCK_FILE_NAME,
    MANIFEST_NAME,
    RUN_FILE_NAME,
    CheckpointError,
    OutputDirInUseError,
    OutputDirLock,
)

from tiny import copy_run, run

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


# ----------------------------------------------------------------------------------------------------------------
# Content digests
# ----------------------------------------------------------------------------------------------------------------


def test_the_manifest_holds_each_files_digest_and_the_written_bytes_match_it(straight_run):
    import hashlib

    manifest = json.loads((straight_run / "step_4" / MANIFEST_NAME).read_text())
    assert set(manifest["sha256"]) == set(manifest["files"])  # every file has its digest
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((straight_run / "step_4" / name).read_bytes()).hexdigest() == digest, name


def test_the_large_files_are_digested_as_they_are_written_not_read_back(tmp_path, monkeypatch):
    from ijepa_hf.training import checkpointing

    read_back = []
    original = checkpointing._sha256_of_file

    def spy(path, handle=None):
        read_back.append(Path(path).name)
        return original(path, handle)

    monkeypatch.setattr(checkpointing, "_sha256_of_file", spy)
    run(tmp_path / "run", "--checkpointing_steps", "2", steps=2)
    manifest = json.loads((tmp_path / "run" / "step_2" / MANIFEST_NAME).read_text())
    assert {"model.safetensors", "optimizer.bin"} <= set(manifest["sha256"])
    assert read_back == ["random_states_0.pkl"]  # only the small file accelerate writes with torch.save itself


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin"])
def test_a_file_swapped_with_the_same_size_file_of_another_checkpoint_is_refused_naming_it(straight_run, tmp_path,
                                                                                            name):
    out = copy_run(straight_run, tmp_path / "run", "step_4", "step_8")
    older, newer = out / "step_4" / name, out / "step_8" / name
    assert older.stat().st_size == newer.stat().st_size  # the sizes alone cannot tell them apart
    swapped = older.read_bytes()
    older.write_bytes(newer.read_bytes())
    newer.write_bytes(swapped)
    with pytest.raises(CheckpointError, match=f"{name} .*differ from what was written"):
        run(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")


# ----------------------------------------------------------------------------------------------------------------
# The output folder deleted while the run trains
# ----------------------------------------------------------------------------------------------------------------


def _delete_folder_at(monkeypatch, output_dir: Path, update: int, then=None) -> None:
    """Delete ``output_dir`` (as ``rm -rf`` would) when the run reaches ``update``; then call ``then()``."""
    from ijepa_hf.training import loop

    original = loop.PretrainingStep.__call__

    def call(self, batch, step, **kwargs):
        if step == update and output_dir.exists():
            shutil.rmtree(output_dir)
            if then is not None:
                then()
        return original(self, batch, step, **kwargs)

    monkeypatch.setattr(loop.PretrainingStep, "__call__", call)


def test_an_output_folder_deleted_mid_run_is_recreated_with_its_lock_and_run_file(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    _delete_folder_at(monkeypatch, out, update=3)
    with caplog.at_level("WARNING"):
        result = run(out, "--checkpointing_steps", "2", steps=6)
    assert result.global_step == 6
    assert "was deleted while the run was training" in caplog.text
    assert (out / LOCK_FILE_NAME).exists() and (out / "model.safetensors").exists()
    run_id = json.loads((out / RUN_FILE_NAME).read_text())["run_id"]
    manifest = json.loads((out / "step_6" / MANIFEST_NAME).read_text())
    assert manifest["run_id"] == run_id  # so that --resume_from_checkpoint latest finds the run's checkpoints
    assert not (out / "step_2").exists()  # deleted with the folder: nothing is pretended


def test_a_deleted_output_folder_taken_by_another_run_stops_this_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    other = OutputDirLock(out)
    _delete_folder_at(monkeypatch, out, update=3, then=other.acquire)  # another run starts in the empty folder
    try:
        with pytest.raises(OutputDirInUseError, match="in use by another run"):
            run(out, "--checkpointing_steps", "2", steps=6)
    finally:
        other.release()
    assert not any(p.name.startswith("step_") for p in out.iterdir())  # nothing written into the other's folder


# ----------------------------------------------------------------------------------------------------------------
# A full disk during the final export
# ----------------------------------------------------------------------------------------------------------------


def test_a_full_disk_during_the_final_export_says_so_and_names_the_checkpoint_to_resume(tmp_path, monkeypatch):
    from ijepa_hf.training import loop
    from ijepa_hf.training.export import ExportError

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    original = loop.save_final_model

    def fill_then_export(*args, **kwargs):
        free = shutil.disk_usage(mount).free
        (mount / "filler").write_bytes(b"\0" * max(0, free - 20_000))  # another job fills the disk
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "save_final_model", fill_then_export)
    try:
        out = mount / "run"
        with pytest.raises(ExportError, match="No space left on the device .* writing the final model") as error:
            run(out, "--checkpointing_steps", "4", steps=6)
        assert "step_4" in str(error.value) and "--resume_from_checkpoint latest" in str(error.value)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


# ----------------------------------------------------------------------------------------------------------------
# The Hub push: a failure says what to do, and a retry does not train again
# ----------------------------------------------------------------------------------------------------------------


def test_a_failed_push_names_the_push_command_and_a_retry_does_not_retrain(tmp_path, monkeypatch, fake_hub,
                                                                           hf_home):
    from huggingface_hub import HfApi
    from hub_utils import hub_env

    from ijepa_hf.training.export import HubPushError

    def unreachable(self, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    out = tmp_path / "run"
    with pytest.raises(HubPushError, match="ijepa-hf push") as error:
        run(out, "--push_to_hub", "--hub_model_id", "someone/tiny-run", steps=2)
    assert "Connection refused" in str(error.value) and (out / "model.safetensors").exists()
    # the same command again, continuing the run: refused rather than trained again from scratch
    trained = load_file(out / "model.safetensors")
    with pytest.raises(ValueError, match="finished .*--checkpointing_steps.*--extend_run.*ijepa-hf push"):
        run(out, "--push_to_hub", "--hub_model_id", "someone/tiny-run", "--resume_from_checkpoint", "latest",
            steps=2)
    assert all(torch.equal(trained[k], v) for k, v in load_file(out / "model.safetensors").items())
    # the command the error names pushes the finished run
    proc = subprocess.run([sys.executable, "-m", "ijepa_hf.cli", "push", str(out), "someone/tiny-run"],
                          env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listing = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import HfApi; print(sorted(HfApi().list_repo_files('someone/tiny-run')))"],
        env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=60)
    files = listing.stdout
    assert "model.safetensors" in files and "encoder/model.safetensors" in files and "train_log.jsonl" in files
    assert RUN_FILE_NAME not in files and LOCK_FILE_NAME not in files


def test_a_push_waits_for_the_run_training_in_the_folder(tmp_path, fake_hub, hf_home):
    """`ijepa-hf push` of a folder a run is training into (a finished run extended with --extend_run, a new run
    overwriting it) uploaded whatever was there at that moment: the earlier final model beside the new run's log, or
    a model file half-written at the end. It holds the folder's run lock while it uploads, so it is refused, naming
    the run, while one trains there (and a run cannot start there during the upload)."""
    from hub_utils import hub_env

    from ijepa_hf.training.checkpointing import OutputDirLock

    out = tmp_path / "run"
    run(out, steps=2)
    push = [sys.executable, "-m", "ijepa_hf.cli", "push", str(out), "someone/busy"]
    with OutputDirLock(out):  # the run training there
        proc = subprocess.run(push, env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is in use by another run" in proc.stderr, proc.stderr[-3000:]
    assert f'"pid": {os.getpid()}' in proc.stderr, proc.stderr[-3000:]
    listing = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import HfApi; print(HfApi().repo_exists('someone/busy'))"],
        env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=60)
    assert listing.stdout.strip() == "False", listing.stderr[-2000:]
    proc = subprocess.run(push, env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_an_overwriting_run_that_stopped_early_publishes_nothing_of_the_other_run(tmp_path, fake_hub, hf_home):
    """--overwrite_output_dir left the other run's final model, encoder/, cards and curves in the folder until the
    new run wrote its own: a new run that stopped early (here a non-finite loss) left a folder that `ijepa-hf push`
    published as a finished run, the other run's model beside the new run's log. The other run's outputs and
    checkpoints are now moved aside when the new run starts, and a folder whose run has not finished is not pushed."""
    from hub_utils import hub_env

    from ijepa_hf.training import NonFiniteLossError

    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", steps=2)
    finished = load_file(out / "model.safetensors")
    with pytest.raises(NonFiniteLossError):
        run(out, "--overwrite_output_dir", "--learning_rate", "100", steps=8)
    assert not (out / "model.safetensors").exists() and not (out / "encoder").exists()
    replaced = next(out.glob("_replaced-*"))
    kept = load_file(replaced / "model.safetensors")
    assert all(torch.equal(kept[name], value) for name, value in finished.items())
    assert (replaced / "encoder" / "model.safetensors").is_file() and (replaced / "step_2").is_dir()
    proc = subprocess.run([sys.executable, "-m", "ijepa_hf.cli", "push", str(out), "someone/unfinished"],
                          env=hub_env(fake_hub, hf_home), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "holds no finished run" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# Settings that cannot be honoured are refused before the folder is touched
# ----------------------------------------------------------------------------------------------------------------


def test_a_warmup_longer_than_the_run_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="--warmup_steps 10 is longer than the run \\(4 steps\\)"):
        run(out, "--warmup_steps", "10", steps=4)
    assert not out.exists()


def test_push_names_what_a_folder_holds_when_it_is_not_a_finished_run(tmp_path, straight_run):
    """`ijepa-hf push` said "holds no finished run ... finish the training first" for a checkpoint of a finished run,
    a fine-tuned classifier and a folder that does not exist alike; each is now named, with what to push instead.
    Nothing reaches the Hub: these are refused before any upload."""
    from ijepa_hf import IJepaEncoderForImageClassification
    from ijepa_hf.training.export import ExportError, push_output_dir
    from tiny import tiny_encoder_config

    with pytest.raises(ExportError, match=r"is a training checkpoint, not a run's output folder: push .*run"):
        push_output_dir(straight_run / "step_4", "me/x")
    classifier = tmp_path / "classifier"
    IJepaEncoderForImageClassification(tiny_encoder_config(num_labels=3)).save_pretrained(classifier)
    with pytest.raises(ExportError, match=r"holds a model of type 'ijepa_hf_encoder' without encoder/, not a "
                                          r"pretraining run's output"):
        push_output_dir(classifier, "me/x")
    with pytest.raises(ExportError, match="there is no folder"):
        push_output_dir(tmp_path / "nothere", "me/x")

"""A pretraining run under deliberate faults: kill -9 during a save, partial checkpoint folders, a full disk, an old
run's folder, two runs in one folder, a huge learning rate, a torn log line, changed settings on resume, planted
pickle payloads, conflicting flags, a stopped rank. Every run uses the tiny config of test_pretraining."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ijepa_hf.training import NonFiniteLossError, PretrainingArguments, PretrainingSchedule, parse_args, pretrain
from ijepa_hf.training.checkpointing import (
    LOCK_FILE_NAME,
    MANIFEST_NAME,
    CheckpointError,
    OutputDirInUseError,
    OutputDirLock,
    latest_checkpoint,
    list_checkpoints,
)

from tiny import REPO_ROOT, TINY_OVERRIDES, copy_run, free_port, read_log, run, tiny_argv


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def reference(straight_run: Path) -> Path:
    """An uninterrupted 8-step run with checkpoints at steps 4 and 8 (conftest's ``straight_run``)."""
    return straight_run


# ----------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["no_manifest", "truncated_weights", "empty_folder"])
def test_latest_skips_an_incomplete_checkpoint_and_resumes_the_previous_one(reference, tmp_path, damage, caplog):
    out = copy_run(reference, tmp_path / "run", "step_4", "step_8")
    step_8 = out / "step_8"
    if damage == "no_manifest":
        (step_8 / MANIFEST_NAME).unlink()
    elif damage == "truncated_weights":
        weights = step_8 / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        shutil.rmtree(step_8)
        step_8.mkdir()
    with caplog.at_level("WARNING"):
        result = run(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
    assert result.resumed_from == str(out / "step_4") and result.global_step == 8
    assert f"Skipping checkpoint {step_8}" in caplog.text
    assert _same(_weights(out), _weights(reference))
    assert latest_checkpoint(out).path == step_8 and latest_checkpoint(out).complete  # rewritten by the resume


def test_kill_9_during_a_save_leaves_a_resumable_folder(reference, tmp_path):
    """SIGKILL the moment a checkpoint is being written; resuming gives the uninterrupted run's weights."""
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = ("import sys; from ijepa_hf.training import parse_args, pretrain; "
            "pretrain(parse_args(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", code, *tiny_argv(out, "--checkpointing_steps", "1")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_during = None
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if out.is_dir():
            partial = [p.name for p in out.iterdir() if p.name.startswith(".step_") and p.name.endswith(".incomplete")]
            if partial and partial[0] not in (".step_1.incomplete", ".step_2.incomplete"):
                proc.send_signal(signal.SIGKILL)
                killed_during = partial[0]
                break
        time.sleep(0.0005)
    proc.wait(30)
    if killed_during is None:
        pytest.skip("the run finished before a save could be caught in flight")
    assert proc.returncode == -signal.SIGKILL
    assert all(info.complete for info in list_checkpoints(out)), "a step_<N> folder is incomplete"
    result = run(out, "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    assert result.global_step == 8 and not any(p.name.endswith(".incomplete") for p in out.iterdir())
    assert _same(_weights(out), _weights(reference)), f"killed while writing {killed_during}"


def test_a_full_disk_says_so_and_keeps_the_earlier_checkpoints(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mount / "run"
        with pytest.raises(CheckpointError, match="No space left on the device") as error:
            run(out, "--checkpointing_steps", "2")
        assert "earlier checkpoints are intact" in str(error.value)
        complete = [info for info in list_checkpoints(out) if info.complete]
        assert complete and complete[0].path.name == "step_2"
        assert not any(p.name.endswith(".incomplete") for p in out.iterdir())
        saved = load_file(complete[-1].path / "model.safetensors")  # readable, and so is its manifest
        assert saved and json.loads((complete[-1].path / MANIFEST_NAME).read_text())["step"] == complete[-1].step
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # lazy: the error may still hold a file open


def test_checkpoints_total_limit_keeps_the_newest_of_this_run(tmp_path):
    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2")
    assert [info.path.name for info in list_checkpoints(out)] == ["step_6", "step_8"]


def test_resuming_an_older_checkpoint_moves_the_abandoned_branch_aside(tmp_path, caplog):
    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", steps=8)  # step_2 .. step_8
    straight = {path.name: (path / "checkpoint.json").read_text() for path in out.glob("step_*")}
    with caplog.at_level("WARNING"):
        result = run(out, "--checkpointing_steps", "2", "--checkpoints_total_limit", "2",
                     "--resume_from_checkpoint", str(out / "step_4"), steps=8)
    assert result.resumed_from == str(out / "step_4") and result.global_step == 8
    # step_6 and step_8 of the abandoned branch were moved aside, named in a warning, before anything else ...
    aside = sorted(out.glob("_abandoned-*/step_*"))
    assert [path.name for path in aside] == ["step_6", "step_8"]
    assert all((path / "checkpoint.json").read_text() == straight[path.name] for path in aside)
    assert "step_6" in caplog.text and "abandoned" in caplog.text
    # ... so pruning kept the new branch's newest two (it would have deleted each new one at once), ...
    assert [info.path.name for info in list_checkpoints(out)] == ["step_6", "step_8"]
    assert all(json.loads((out / name / "checkpoint.json").read_text())["saved"] for name in ("step_6", "step_8"))
    # ... and latest is the new branch's step_8, never the abandoned one.
    assert latest_checkpoint(out).path == out / "step_8"
    assert (out / "step_8" / "checkpoint.json").read_text() != straight["step_8"]


def test_resume_compares_the_precision_that_ran_not_the_flag(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", "--mixed_precision", "no", steps=4)
    # unset and "no" are the same fp32: accepted
    shutil.rmtree(out / "step_4")
    assert run(out, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=4).global_step == 4
    # bf16 set the way a launcher or an accelerate config sets it is bf16: the checkpoint records it ...
    from accelerate.state import AcceleratorState

    launched = tmp_path / "launched"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(reset_partial_state=True)  # a new process, as a launcher starts
    run(launched, "--checkpointing_steps", "2", steps=2)
    AcceleratorState._reset_state(reset_partial_state=True)  # and again for the resume, in fp32
    assert json.loads((launched / "step_2" / "checkpoint.json").read_text())["state"]["mixed_precision"] == "bf16"
    # ... and a resume in fp32 is refused, naming it
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ValueError, match="the mixed precision is 'no', the checkpoint ran with 'bf16'"):
        run(launched, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=4)


def test_resume_under_another_distributed_strategy_is_refused_naming_it(tmp_path):
    from ijepa_hf.training.arguments import build_config
    from ijepa_hf.training.resume import check_resume_compatible

    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", steps=2)
    saved = json.loads((out / "step_2" / "checkpoint.json").read_text())["state"]
    assert saved["distributed_type"] == "NO"
    args = parse_args(tiny_argv(out, "--resume_from_checkpoint", "latest", steps=2))
    with pytest.raises(ValueError, match="the distributed type is 'FSDP', the checkpoint ran with 'NO'"):
        check_resume_compatible(saved, args, build_config(args), 1, 2, mixed_precision="no", distributed_type="FSDP")
    check_resume_compatible(saved, args, build_config(args), 1, 2, mixed_precision="no", distributed_type="NO")


def _image_folder(folder: Path, count: int) -> Path:
    import numpy as np
    from PIL import Image

    for index in range(count):
        (folder / f"class{index % 2}").mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"class{index % 2}" / f"{index:03d}.png")
    return folder


def test_resume_checks_the_images_not_the_folders_path(tmp_path):
    data = _image_folder(tmp_path / "data", 24)
    out = tmp_path / "run"
    common = ("--checkpointing_steps", "2", "--online_probe_steps", "0")
    run(out, "--train_dir", str(data), *common, steps=4)
    fingerprint = json.loads((out / "step_2" / "checkpoint.json").read_text())["state"]["data"]
    assert fingerprint["kind"] == "image folder" and fingerprint["files"] == 24
    # the same images staged at another path (a job's local scratch) resume, to the same weights
    staged = tmp_path / "scratch" / "data"
    shutil.copytree(data, staged)
    shutil.rmtree(out / "step_4")
    straight = _model_weights(out)
    resumed = run(out, "--train_dir", str(staged), *common, "--resume_from_checkpoint", "latest", steps=4)
    assert resumed.resumed_from == str(out / "step_2")
    assert all(torch.equal(straight[k], v) for k, v in _model_weights(out).items())
    # a folder that changed (one image more) is refused, naming the data
    _image_folder(staged, 25)
    shutil.rmtree(out / "step_4")
    with pytest.raises(ValueError, match="the training data differ from the checkpoint's: .*files 25 \\(was 24\\)"):
        run(out, "--train_dir", str(staged), *common, "--resume_from_checkpoint", "latest", steps=4)


def _model_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def test_fp16_on_cpu_is_refused_rather_than_silently_fp32(tmp_path):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a new process
    try:
        with pytest.raises(ValueError, match="fp16 mixed precision is not applied on CPU.*bf16"):
            run(tmp_path / "run", "--mixed_precision", "fp16", steps=2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "run").exists()


def test_pruning_never_removes_the_newest_checkpoint(tmp_path):
    from ijepa_hf.training.checkpointing import prune_checkpoints

    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "2", steps=6)
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert prune_checkpoints(out, run_id, keep=1, newest=out / "step_2") == [out / "step_4", out / "step_6"]
    assert [info.path.name for info in list_checkpoints(out)] == ["step_2"]


# ----------------------------------------------------------------------------------------------------------------
# The output folder: another run, a second process
# ----------------------------------------------------------------------------------------------------------------


def test_a_folder_holding_another_run_is_refused_and_overwriting_never_resumes_it(reference, tmp_path):
    old = copy_run(reference, tmp_path / "run", "step_4", "step_8")
    with pytest.raises(ValueError, match="already holds another run .* Use --resume_from_checkpoint latest to continue "
                                         "it, --overwrite_output_dir to start a new run there"):
        run(old, steps=4)
    # A new run overwrites; its pruning never deletes its own newest checkpoint for the old run's step_8.
    run(old, "--overwrite_output_dir", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1", steps=4)
    new_run = json.loads((old / "run.json").read_text())["run_id"]
    mine = [info for info in list_checkpoints(old) if info.run_id == new_run]
    assert [info.path.name for info in mine] == ["step_4"]
    # the other run's checkpoints are moved aside, whole, and never resumed
    assert sorted(path.name for path in next(old.glob("_replaced-*")).glob("step_*")) == ["step_4", "step_8"]
    result = run(old, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest", steps=4)
    assert result.resumed_from == str(old / "step_4")


def test_the_lock_excludes_a_run_of_an_earlier_version_that_locked_the_earlier_lock_file(tmp_path):
    """The lock file was renamed (`.ijepa_hf.lock` -> `_ijepa_hf.lock`, which no push uploads): where an earlier
    version left its lock file, a run of it still training there must exclude a new run, and the new run must
    exclude it, or the two would train into one folder each holding its own file."""
    import fcntl

    from ijepa_hf.training.checkpointing import LEGACY_LOCK_FILE_NAME, OutputDirInUseError, OutputDirLock

    out = tmp_path / "run"
    out.mkdir()
    legacy = out / LEGACY_LOCK_FILE_NAME
    legacy.write_text('{"pid": 1234, "host": "node7"}')
    with open(legacy, encoding="utf-8") as held:  # the earlier version's run
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputDirInUseError, match=r"in use by another run .*node7.*earlier version"):
            OutputDirLock(out).acquire()
    lock = OutputDirLock(out).acquire()  # the earlier run has ended
    try:
        with open(legacy, encoding="utf-8") as later, pytest.raises(BlockingIOError):
            fcntl.flock(later.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # how the earlier version takes its lock
    finally:
        lock.release()
    with open(legacy, encoding="utf-8") as later:
        fcntl.flock(later.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the lock


def test_a_second_run_into_a_folder_in_use_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ijepa_hf.training.checkpointing import OutputDirLock; "
                               "lock = OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
         str(out)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(OutputDirInUseError, match=rf"in use by another run .*\"pid\": {holder.pid}"):
            run(out, steps=2)
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
    OutputDirLock(out).acquire().release()  # the kernel dropped the dead holder's lock
    assert run(out, steps=2).global_step == 2


def test_the_lock_names_the_holders_command_without_its_token(tmp_path, monkeypatch):
    """The lock file records the holder's command line, and a second run prints it: a Hub token given on that line
    (--hub_token, --token) is written as *** (it used to reach the folder and the other run's terminal in clear)."""
    secret = "hf_" + "x" * 30
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "--hub_token", secret, "--push_to_hub", f"--token={secret}"])
    with OutputDirLock(tmp_path / "run"):
        with pytest.raises(OutputDirInUseError) as refused:
            OutputDirLock(tmp_path / "run").acquire()
        written = (tmp_path / "run" / "_ijepa_hf.lock").read_text()
    assert secret not in str(refused.value) and secret not in written
    assert "pretrain.py --hub_token *** --push_to_hub --token=***" in written


# ----------------------------------------------------------------------------------------------------------------
# Non-finite loss
# ----------------------------------------------------------------------------------------------------------------


def test_non_finite_features_give_nan_statistics_not_a_linear_algebra_error(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ijepa_hf.training.metrics import collapse_statistics, effective_rank

    nan = torch.full((4, 8), float("nan"))
    assert effective_rank(nan) != effective_rank(nan)  # nan, where svdvals raised LinAlgError
    stats = collapse_statistics(SimpleNamespace(target_hidden_state=nan[:, None].expand(4, 3, 8), targets=nan,
                                                predictions=nan))
    assert all(value != value for value in stats.values())
    # a run whose images turn non-finite stops with the documented error at the log row, naming the step
    from ijepa_hf.data import pretraining

    original = pretraining.PretrainingData.model_inputs

    def poisoned(self, batch):
        batch = original(self, batch)
        batch["pixel_values"] = batch["pixel_values"] * float("nan")
        return batch

    monkeypatch.setattr(pretraining.PretrainingData, "model_inputs", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite .* at step 1"):
        run(tmp_path / "run", "--logging_steps", "2", steps=4)


def test_a_malformed_middle_log_line_does_not_block_the_resume(tmp_path, caplog):
    out = tmp_path / "run"
    run(out, "--checkpointing_steps", "4", steps=8)
    shutil.rmtree(out / "step_8")
    lines = (out / "train_log.jsonl").read_text().splitlines()
    lines.insert(1, "{ an edited line")
    (out / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        result = run(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest", steps=8)
    assert result.global_step == 8 and "train_log.jsonl:2 is not a JSON object" in caplog.text
    aside = list(out.glob("train_log.jsonl.corrupt-*"))
    assert len(aside) == 1 and "{ an edited line" in aside[0].read_text()
    assert [row["step"] for row in read_log(out)] == [2, 4, 6, 8]


def test_a_huge_learning_rate_stops_the_run_and_saves_nothing_non_finite(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(NaN/inf\) at step \d+ .*learning rate") as error:
        run(out, "--learning_rate", "100", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", steps=8)
    assert not (out / "model.safetensors").exists() and not (out / "encoder").exists()
    checkpoints = [info for info in list_checkpoints(out) if info.complete]
    assert all(info.step < error.value.update for info in checkpoints)
    for info in checkpoints:  # the last finite checkpoints are kept, and they are finite
        assert all(torch.isfinite(t).all() for t in load_file(info.path / "model.safetensors").values())


# ----------------------------------------------------------------------------------------------------------------
# Resume: torn log line, changed settings, planted payloads
# ----------------------------------------------------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_with_a_warning(reference, tmp_path, caplog):
    out = copy_run(reference, tmp_path / "run", "step_4")
    with (out / "train_log.jsonl").open("a") as handle:
        handle.write('{"step": 9, "loss": 0.4')  # what a full disk leaves
    with caplog.at_level("WARNING"):
        result = run(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
    assert result.global_step == 8 and "cut off" in caplog.text
    assert [r["step"] for r in read_log(out)] == [r["step"] for r in read_log(reference)]


@pytest.mark.parametrize("change, field", [
    (("--per_device_train_batch_size", "4"), "--per_device_train_batch_size"),
    (("--learning_rate", "2e-3"), "--learning_rate"),
    (("--seed", "1"), "--seed"),
    (("--max_train_steps", "12"), "--extend_run"),
    (("--config_overrides", TINY_OVERRIDES.replace("predictor.hidden_size=16", "predictor.hidden_size=24")),
     "config predictor_config.hidden_size"),
])
def test_resume_under_changed_settings_is_refused_naming_the_field(reference, tmp_path, change, field):
    out = copy_run(reference, tmp_path / "run", "step_4")
    argv = tiny_argv(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
    index = argv.index(change[0]) if change[0] in argv else None
    if index is None:
        argv += list(change)
    else:
        argv[index + 1] = change[1]
    with pytest.raises(ValueError, match=rf"Cannot resume exactly: .*{field}"):
        pretrain(parse_args(argv))


def test_a_refused_resume_leaves_the_later_checkpoints_where_they_were(reference, tmp_path):
    """Resuming an earlier checkpoint moves the later ones aside (the branch it abandons). A resume refused for its
    settings used to have moved them already: the folder's `latest` was then the earlier checkpoint, and the next
    `--resume_from_checkpoint latest` went on from there, the later steps' work set aside without a word in the
    error. The checkpoint is checked before anything in the folder moves."""
    out = copy_run(reference, tmp_path / "run", "step_4", "step_8")
    argv = tiny_argv(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", str(out / "step_4"),
                     "--learning_rate", "2e-3")
    with pytest.raises(ValueError, match="Cannot resume exactly: .*--learning_rate"):
        pretrain(parse_args(argv))
    assert sorted(path.name for path in out.iterdir()) == [LOCK_FILE_NAME, "run.json", "step_4", "step_8",
                                                          "train_log.jsonl"]


def test_extend_run_recomputes_the_schedules_for_the_new_length(reference, tmp_path):
    out = copy_run(reference, tmp_path / "run", "step_8")
    result = run(out, "--resume_from_checkpoint", "latest", "--extend_run", steps=12)
    assert result.global_step == 12 and result.resumed_from == str(out / "step_8")
    schedule = PretrainingSchedule(total_steps=12, warmup_steps=2, start_lr=2e-4, peak_lr=5e-4, final_lr=1e-6,
                                   ema_start=0.996, ema_end=1.0)
    rows = {r["step"]: r for r in read_log(out)}
    assert sorted(rows) == [2, 4, 6, 8, 10, 12]
    for step in (10, 12):  # the new curves, not the finished run's final lr 1e-6 and momentum 1.0
        assert rows[step]["lr"] == pytest.approx(schedule.lr_at(step))
        assert rows[step]["momentum"] == pytest.approx(schedule.momentum_at(step))
    assert rows[10]["lr"] > 1e-5


class _Payload:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix not in (".safetensors", ".json"))


def test_resuming_never_unpickles_code(reference, tmp_path):
    names = _pickle_files(reference / "step_4")
    assert names, "expected pickle-format files (optimizer, RNG states) in a checkpoint"
    for name in [*names, "custom_checkpoint_0.pkl"]:  # each file of the loop's, and one an attacker adds
        out = copy_run(reference, tmp_path / name, "step_4")
        marker = tmp_path / f"{name}.executed"
        target = out / "step_4" / name
        torch.save({"state": _Payload(marker)}, target)
        for consistent_manifest in (False, True):  # a careful attacker also rewrites the manifest
            if consistent_manifest:  # ... its sizes and digests, so that only weights_only=True stands in the way
                manifest = json.loads((out / "step_4" / MANIFEST_NAME).read_text())
                manifest["files"][name] = target.stat().st_size
                manifest["sha256"][name] = hashlib.sha256(target.read_bytes()).hexdigest()
                (out / "step_4" / MANIFEST_NAME).write_text(json.dumps(manifest))
            with pytest.raises(CheckpointError, match="nothing in it was executed|has no complete checkpoint"):
                run(out, "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest")
            assert not marker.exists(), f"resuming executed the payload planted in {name}"


# ----------------------------------------------------------------------------------------------------------------
# Arguments that mean what they say
# ----------------------------------------------------------------------------------------------------------------


def test_conflicting_and_invalid_flags_are_errors():
    with pytest.raises(ValueError, match="--image_size and --config_overrides encoder.image_size"):
        PretrainingArguments(image_size=30, config_overrides="encoder.image_size=32")
    with pytest.raises(ValueError, match="--mask_mode and --config_overrides mask_mode"):
        PretrainingArguments(mask_mode="official", config_overrides="mask_mode=fixed")
    with pytest.raises(ValueError, match="--ema_momentum and --config_overrides ema_momentum"):
        PretrainingArguments(ema_momentum="0.99,1", config_overrides="ema_momentum=[0.99,1.0]")
    from ijepa_hf.training import build_config

    with pytest.raises(ValueError, match="not divisible"):
        build_config(PretrainingArguments(image_size=30, config_overrides="encoder.patch_size=8"))
    with pytest.raises(ValueError, match="give only one of them"):
        PretrainingArguments(overwrite_output_dir=True, resume_from_checkpoint="latest")
    assert PretrainingArguments(max_grad_norm=-1).clip_grad_norm is None
    assert PretrainingArguments(max_grad_norm=0).clip_grad_norm is None
    assert PretrainingArguments(max_grad_norm=1.5).clip_grad_norm == 1.5


def test_help_shows_the_real_defaults():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "pretrain.py"), "--help"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                          timeout=120)
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "NUM_TRAIN_EPOCHS Epochs (ignored when --max_train_steps is set). (default: 1)" in text
    assert "PER_DEVICE_TRAIN_BATCH_SIZE Batch size per process (embedded demo: 16). (default: 64)" in text
    assert "LEARNING_RATE Peak (reference) learning rate (official 1e-3; embedded demo: 5e-4). (default: 0.001)" in text


# ----------------------------------------------------------------------------------------------------------------
# A stopped rank
# ----------------------------------------------------------------------------------------------------------------


def _rank_pids(token: str) -> dict[int, int]:
    """``{RANK: pid}`` of the launcher's worker processes (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if env.get(b"IJEPA_HF_TEST_LAUNCH") == token.encode() and b"RANK" in env and b"LOCAL_RANK" in env:
            if "python" in status.split("\n", 1)[0].lower():
                found[int(env[b"RANK"])] = int(entry.name)
    return found


def test_a_stopped_rank_ends_the_run_within_the_ddp_timeout(tmp_path):
    out = tmp_path / "two"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO_ROOT / "examples" / "pretrain.py"),
        *tiny_argv(out, "--ddp_timeout", "15", "--logging_steps", "1", images=32, batch=4, steps=100000),
    ]
    token = uuid.uuid4().hex
    env["IJEPA_HF_TEST_LAUNCH"] = token  # the workers inherit it: how they are found in /proc
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    stopped = None
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and launcher.poll() is None:
            log = out / "train_log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        ranks = _rank_pids(token)
        assert set(ranks) == {0, 1}, f"worker processes not found: {ranks}"
        stopped = ranks[1]
        os.kill(stopped, signal.SIGSTOP)
        started = time.monotonic()
        try:
            output, _ = launcher.communicate(timeout=150)
        except subprocess.TimeoutExpired:
            pytest.fail("the run still hangs 150 s after a rank stopped, with --ddp_timeout 15")
        assert launcher.returncode != 0
        assert time.monotonic() - started < 150
        assert "imed out" in output or "timeout" in output.lower(), output[-3000:]
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


# ----------------------------------------------------------------------------------------------------------------
# Collapse telemetry
# ----------------------------------------------------------------------------------------------------------------


def _near_collapse(scale: float = 1.0) -> dict[str, float]:
    """Pooled features that all point one way plus a little per-image noise (pairwise cosine ~0.9995)."""
    from types import SimpleNamespace

    from ijepa_hf.training.metrics import collapse_statistics

    generator = torch.Generator().manual_seed(0)
    common = torch.randn(1, 1, 32, generator=generator) * 3.0
    hidden = (common + 0.07 * torch.randn(8, 1, 32, generator=generator)).expand(8, 16, 32) * scale
    tokens = torch.randn(8, 3, 32, generator=generator)
    return collapse_statistics(SimpleNamespace(target_hidden_state=hidden, targets=tokens, predictions=tokens))


def test_the_collapse_warning_sees_a_near_collapse_that_the_std_misses(caplog):
    from ijepa_hf.training.metrics import CollapseMonitor

    stats = _near_collapse()
    assert stats["target_cosine"] > 0.999 and stats["target_std"] > 0.01  # the std alone calls this healthy
    assert 1.0 <= stats["target_rankme"] < 2.0
    # LayerNorm'ed pooling makes the statistics blind to the features' scale.
    assert _near_collapse(scale=100.0)["target_cosine"] == pytest.approx(stats["target_cosine"], abs=1e-6)
    with caplog.at_level("WARNING", logger="ijepa_hf.training.metrics"):
        assert CollapseMonitor().check({"step": 7, **stats})
        assert not CollapseMonitor().check({"step": 7, "target_cosine": 0.99, "target_std": 0.1})
    assert "Possible representation collapse at step 7: target_cosine=0.999" in caplog.text


@pytest.mark.parametrize("extra", [(), ("--learning_rate", "1e-3")])
def test_the_collapse_warning_stays_quiet_on_default_runs(tmp_path, caplog, extra):
    with caplog.at_level("WARNING", logger="ijepa_hf.training.metrics"):
        run(tmp_path / "run", *extra, "--logging_steps", "1", steps=60)
    rows = read_log(tmp_path / "run")
    assert len(rows) == 60 and all(r["target_cosine"] < 0.999 for r in rows)
    assert "collapse" not in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Step options through the loop
# ----------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_run(reference, tmp_path):
    run(tmp_path / "recomputed", "--gradient_checkpointing", "--checkpointing_steps", "4")
    left, right = _weights(reference), _weights(tmp_path / "recomputed")
    assert max((left[k] - right[k]).abs().max().item() for k in left) < 1e-6


def test_bf16_autocast_trains_close_to_fp32(reference, tmp_path):
    # A fresh process: Accelerate's mixed-precision state is process-wide.
    out = tmp_path / "bf16"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = "import sys; from ijepa_hf.training import parse_args, pretrain; pretrain(parse_args(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *tiny_argv(out, "--mixed_precision", "bf16")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Mixed precision type: bf16" in proc.stderr
    fp32, bf16 = _weights(reference), _weights(out)
    assert all(t.dtype == torch.float32 for t in bf16.values())  # master weights stay fp32
    worst = max((fp32[k] - bf16[k]).abs().max().item() for k in fp32)
    assert 0 < worst < 0.05, f"bf16 run differs from fp32 by {worst}"
    losses = [r["loss"] for r in read_log(out)]
    assert losses == pytest.approx([r["loss"] for r in read_log(reference)], abs=0.02)


def test_a_refused_folder_ends_every_rank_at_once(reference, tmp_path):
    """The main process decides the folder policy; the other rank learns the error instead of waiting for it."""
    out = copy_run(reference, tmp_path / "run", "step_4")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO_ROOT / "examples" / "pretrain.py"), *tiny_argv(out, images=32, batch=4, steps=4),
    ]
    started = time.monotonic()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.monotonic() - started < 120
    output = proc.stdout + proc.stderr
    assert output.count("already holds another run") >= 2, output[-3000:]  # raised on both ranks

"""Pre-emption: a signal mid-run makes every process finish its update, write a complete checkpoint and exit with
code 75; the resumed run ends bitwise where the uninterrupted one does. The SLURM template requeues on its warning
signal (run unmodified, with stand-in srun / scontrol)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ijepa_hf.training import PREEMPTED_EXIT_CODE, parse_args, pretrain
from ijepa_hf.training.checkpointing import latest_checkpoint
from ijepa_hf.training.preemption import PreemptionHandler, parse_signals

from tiny import assert_same_weights, free_port, read_log, tiny_argv

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "pretrain.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def _last_logged_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps, default=0)


def _signal_mid_run(command: list[str], output_dir: Path, after_step: int, send, timeout: float = 240,
                    env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``command`` in its own session, wait until its log reaches ``after_step``, call ``send(process)``;
    returns the finished process and the last step logged before the signal."""
    process = subprocess.Popen(command, env=env or _env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    seen = 0
    while (seen := _last_logged_step(output_dir)) < after_step:
        if process.poll() is not None or time.monotonic() > deadline:
            out = process.communicate()[0] if process.poll() is not None else ""
            process.kill()
            pytest.fail(f"the run ended or stalled before step {after_step}:\n{out[-4000:]}")
        time.sleep(0.05)
    send(process)
    out, _ = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, ""), seen


def _check_stopped_with_checkpoint(output_dir: Path, seen: int, total: int) -> int:
    found = latest_checkpoint(output_dir)
    assert found is not None and found.complete, "no complete checkpoint after the signal"
    assert seen <= found.step < total  # nothing that ran before the signal is redone; the run did stop early
    assert not list(output_dir.glob(".step_*")), "an incomplete save was left behind"
    assert not (output_dir / "model.safetensors").exists()  # stopped, not finished
    return found.step


def test_sigterm_to_the_process_group_stops_with_a_checkpoint_and_resumes_bitwise(tmp_path):
    steps = 300
    argv = lambda out, *extra: tiny_argv(out, "--logging_steps", "1", *extra, steps=steps)  # noqa: E731
    # SIGTERM to the whole group, as SLURM / Kubernetes send it: the DataLoader worker ignores it, the training
    # process finishes the update, saves and exits with 75.
    stopped, seen = _signal_mid_run([sys.executable, str(SCRIPT), *argv(tmp_path / "run", "--num_workers", "1")],
                                    tmp_path / "run", 20, lambda p: os.killpg(p.pid, signal.SIGTERM))
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stdout[-4000:]
    assert "SIGTERM received: stopped after step" in stopped.stdout
    saved = _check_stopped_with_checkpoint(tmp_path / "run", seen, steps)
    resumed = pretrain(parse_args(argv(tmp_path / "run", "--resume_from_checkpoint", "latest")))
    assert resumed.resumed_from == str(tmp_path / "run" / f"step_{saved}") and resumed.global_step == steps
    pretrain(parse_args(argv(tmp_path / "straight")))
    assert_same_weights(tmp_path / "straight", tmp_path / "run")
    assert [r["loss"] for r in read_log(tmp_path / "straight")] == [r["loss"] for r in read_log(tmp_path / "run")]


def test_preemption_signals_none_keeps_the_default_action(tmp_path):
    stopped, _ = _signal_mid_run(
        [sys.executable, str(SCRIPT), *tiny_argv(tmp_path / "run", "--logging_steps", "1", "--preemption_signals",
                                                 "none", steps=300)],
        tmp_path / "run", 5, lambda p: os.kill(p.pid, signal.SIGTERM))
    assert stopped.returncode == -signal.SIGTERM
    assert latest_checkpoint(tmp_path / "run") is None


def _launch(output_dir: Path, *extra: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(free_port()), str(SCRIPT), *tiny_argv(output_dir, "--logging_steps", "1", *extra, images=32,
                                                       batch=4, steps=steps)]


def test_two_processes_stop_after_the_same_update_and_resume_bitwise(tmp_path):
    steps, env = 120, _env(ACCELERATE_USE_CPU="1")
    # SIGTERM to the whole group, as srun delivers it: each rank gets it twice (directly and forwarded by the
    # launcher, which then waits for them); they agree to stop after the same update and save together.
    stopped, seen = _signal_mid_run(_launch(tmp_path / "run", steps=steps), tmp_path / "run", 15,
                                    lambda p: os.killpg(p.pid, signal.SIGTERM), env=env)
    saved = _check_stopped_with_checkpoint(tmp_path / "run", seen, steps)
    assert "SIGTERM received: stopped after step" in stopped.stdout, stopped.stdout[-4000:]
    done = subprocess.run(_launch(tmp_path / "run", "--resume_from_checkpoint", "latest", steps=steps), env=env,
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"Resuming from {tmp_path / 'run' / f'step_{saved}'}" in done.stdout + done.stderr
    straight = subprocess.run(_launch(tmp_path / "straight", steps=steps), env=env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-4000:]
    assert_same_weights(tmp_path / "straight", tmp_path / "run")


def test_signal_names_are_checked_and_the_handler_restores_what_it_replaced():
    assert parse_signals("SIGTERM,usr1,TERM") == (signal.SIGTERM, signal.SIGUSR1)
    assert parse_signals("none") == () and parse_signals("") == ()
    for bad in ("SIGKILL", "FOO"):
        with pytest.raises(ValueError, match="--preemption_signals"):
            parse_signals(bad)
    with pytest.raises(ValueError, match="--preemption_signals"):
        parse_args(["--preemption_signals", "SIGSTOP"])
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler(parse_signals("USR1")) as handler:
        assert not handler.stop_requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.stop_requested() and handler.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one is logged, not acted on
    assert signal.getsignal(signal.SIGUSR1) == before


def test_trainer_saves_and_stops_on_a_signal(tmp_path):
    from transformers import TrainerCallback

    from ijepa_hf import IJepaForPreTraining
    from ijepa_hf.data import MaskedBatchCollator, build_pretraining_data
    from ijepa_hf.training import PreemptionCallback, official_training_arguments
    from ijepa_hf.training.distributed import mask_collator_for_process
    from ijepa_hf.training.trainer import IJepaTrainer
    from tiny import tiny_pretraining_config

    class SignalAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_pretraining_config(min_keep=0, target_scale=(0.2, 0.3), num_target_blocks=2)
    data = build_pretraining_data(image_size=32, seed=0, embedded_num_images=40, uint8_images=True)
    args = official_training_arguments(str(tmp_path / "trainer"), per_device_train_batch_size=8, max_steps=20,
                                       save_strategy="no", report_to="none", logging_steps=5, use_cpu=True)
    preemption = PreemptionCallback()
    before = signal.getsignal(signal.SIGTERM)
    trainer = IJepaTrainer(model=IJepaForPreTraining(config), args=args, train_dataset=data.dataset,
                           data_collator=MaskedBatchCollator(mask_collator_for_process(
                               config, seed=0, num_processes=1, process_index=0)),
                           callbacks=[preemption, SignalAtStep()])
    trainer.train()
    assert trainer.state.global_step == 4  # the update under way when the signal came was finished
    assert preemption.preempted is not None and preemption.preempted.step == 4
    assert (tmp_path / "trainer" / "checkpoint-4" / "model.safetensors").is_file()
    assert signal.getsignal(signal.SIGTERM) == before


# ----------------------------------------------------------------------------------------------------------------
# The SLURM template, unmodified, with stand-in srun / scontrol
# ----------------------------------------------------------------------------------------------------------------


def _stand_in(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def test_slurm_template_requeues_on_its_warning_signal(tmp_path):
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    # srun: record the command line, then be a launcher that stops like the ranks do on SIGTERM (exit 75).
    _stand_in(bin_dir, "srun", f'''printf '%s\\n' "$@" > {record}/srun_args
exec {sys.executable} -c "
import signal, sys, time
def stop(*_):
    open('{record}/srun_signal', 'w').write('SIGTERM')
    sys.exit(75)
signal.signal(signal.SIGTERM, stop)
open('{record}/srun_started', 'w').write('yes')
time.sleep(120)
"
''')
    _stand_in(bin_dir, "scontrol", f'''if [ "$1" = show ]; then echo node1; exit 0; fi
echo "$@" >> {record}/scontrol_calls
''')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242"}
    process = subprocess.Popen(["bash", str(REPO_ROOT / "examples" / "slurm" / "pretrain.sbatch")], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not (record / "srun_started").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # SLURM's warning (--signal=B:USR1@300) to the batch shell
    out, _ = process.communicate(timeout=60)
    assert (record / "srun_signal").read_text() == "SIGTERM", out  # the launcher was told to stop
    assert (record / "scontrol_calls").read_text().split() == ["requeue", "4242"], out
    assert process.returncode == 0, out
    assert "--resume_from_checkpoint latest" in (record / "srun_args").read_text()  # the requeued job continues

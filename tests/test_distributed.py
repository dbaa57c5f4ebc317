"""Sharded pretraining: FSDP2 on 2 CPU processes (gloo) through the shipped Accelerate config, the EMA on local
shards, checkpoint / resume / export under FSDP2, and how the EMA is applied for each distributed strategy (DDP,
FSDP, DeepSpeed ZeRO stages). Every run uses the tiny config of test_pretraining."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from ijepa_hf import IJepaForPreTraining, IJepaPretrainingConfig
from ijepa_hf.training.distributed import EmaMode, ema_mode, update_target_encoder

from tiny import REPO_ROOT, TINY_OVERRIDES, free_port, read_log, run, tiny_argv

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread

FSDP2_CONFIG = REPO_ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"

# Runs pretrain() on every rank, then records what the sharding looks like and checks the EMA on the live
# (still sharded) model: local to each rank (no DTensor collective) and the formula on the local shards.
_FSDP_RANK_SCRIPT = """
import json, sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from ijepa_hf.modeling_ijepa_hf import _matching_local_shards
from ijepa_hf.training import parse_args, pretrain

result = pretrain(parse_args(sys.argv[1:]))
model, rank = result.model, dist.get_rank()
target = dict(model.target_encoder.named_parameters())
context = dict(model.context_encoder.named_parameters())
report = {
    "all_dtensor": all(isinstance(p, DTensor) for p in [*target.values(), *context.values()]),
    "same_layout": all(target[k].placements == context[k].placements and target[k].device_mesh == context[k].device_mesh
                       for k in target),
    "placements": sorted({str(p.placements) for p in target.values()}),
    "local_numel": sum(p.to_local().numel() for p in target.values()),
    "full_numel": sum(p.numel() for p in target.values()),
}
before = {k: p.to_local().clone() for k, p in target.items()}
with CommDebugMode() as comm:
    model.update_target_encoder(0.9)
report["ema_collectives"] = comm.get_total_counts()
report["ema_max_error"] = max(
    (target[k].to_local() - (0.9 * before[k] + 0.1 * context[k].to_local())).abs().max().item()
    for k in target if before[k].numel())
weight = target["blocks.0.mlp.fc1.weight"]
replicated = distribute_tensor(torch.zeros(weight.shape), weight.device_mesh, [Replicate()])
try:
    _matching_local_shards("blocks.0.mlp.fc1.weight", weight, replicated)
    report["mismatch"] = "accepted"
except RuntimeError as error:
    report["mismatch"] = str(error)
with open(f"{result.output_dir}/fsdp_rank{rank}.json", "w") as handle:
    json.dump(report, handle)
dist.destroy_process_group()
"""


def _launch_fsdp2(tmp_path: Path, output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    script = tmp_path / "fsdp_rank_script.py"
    script.write_text(_FSDP_RANK_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2_CONFIG),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()), str(script),
        *tiny_argv(output_dir, "--checkpointing_steps", "2", *HELD_OUT, *extra, images=32, batch=4, steps=4),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: the same global batch (8 = 2 processes x 4) on one process, 4 steps."""
    out = tmp_path_factory.mktemp("one") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    run(out, *HELD_OUT, images=32, batch=8, steps=4)
    torch.set_num_threads(previous)
    return out


# The held-out loss every 2 updates: every rank takes part in it under each strategy, and it does not change the
# training the tests compare.
HELD_OUT = ("--eval_steps", "2", "--max_eval_samples", "16")


def _held_out(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["eval_loss"] for row in read_log(run_dir) if "eval_loss" in row}


def test_fsdp2_on_two_cpu_processes_matches_one_process_resumes_bitwise_and_exports(tmp_path, one_process):
    two = tmp_path / "fsdp2"
    proc = _launch_fsdp2(tmp_path, two)
    output = proc.stdout + proc.stderr
    assert "DistributedType.FSDP" in output and "EMA target encoder update: local_shards" in output
    assert "processes = 2" in output
    assert "returned a view tensor" not in output  # torch's warning, which does not apply here (FSDP2_VIEW_WARNING)

    # Really sharded: every parameter of both encoders is a DTensor shard, laid out pairwise alike; the EMA on
    # the live model issued no collective and follows the formula on the local shards.
    reports = [json.loads((two / f"fsdp_rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["all_dtensor"] and report["same_layout"] and report["placements"] == ["(Shard(dim=0),)"]
        assert report["local_numel"] < report["full_numel"]
        assert report["ema_collectives"] == 0 and report["ema_max_error"] < 1e-6
        assert "sharded identically" in report["mismatch"]
    assert sum(r["local_numel"] for r in reports) == reports[0]["full_numel"]

    one = one_process
    left, right = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert left.keys() == right.keys() and any(k.startswith("target_encoder.") for k in right)
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst < 1e-4, f"1-process and FSDP2 2-process weights differ by {worst}"
    assert [r["loss"] for r in read_log(two)] == pytest.approx([r["loss"] for r in read_log(one)], abs=1e-5)
    assert sorted(_held_out(one)) == [2, 4] and _held_out(two) == pytest.approx(_held_out(one), abs=1e-5)

    # Export: the standalone target encoder holds the gathered (full) target weights.
    encoder = load_file(two / "encoder" / "model.safetensors")
    assert encoder.keys() == {k[len("target_encoder."):] for k in right if k.startswith("target_encoder.")}
    assert all(torch.equal(v, right[f"target_encoder.{k}"]) for k, v in encoder.items())

    # Checkpoints are gathered files read with weights_only (no torch.distributed.checkpoint pickles).
    names = sorted(p.name for p in (two / "step_2").iterdir())
    assert "pytorch_model_fsdp.bin" in names and "optimizer.bin" in names and not any(".distcp" in n for n in names)

    # Resume: a fresh folder holding only step_2 continues to step 4, bitwise the uninterrupted run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "step_2", resumed / "step_2")
    _launch_fsdp2(tmp_path, resumed, "--resume_from_checkpoint", "latest")
    again = load_file(resumed / "model.safetensors")
    different = [k for k in right if not torch.equal(right[k], again[k])]
    assert not different, f"{len(different)} tensors differ after the FSDP2 resume, e.g. {different[:3]}"
    assert [r["loss"] for r in read_log(resumed)] == [r["loss"] for r in read_log(two)][-1:]


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo)
# ----------------------------------------------------------------------------------------------------------------

_PLAIN_RANK_SCRIPT = """
import sys, torch.distributed as dist
from ijepa_hf.training import parse_args, pretrain
pretrain(parse_args(sys.argv[1:]))
dist.destroy_process_group()
"""


def _launch_deepspeed(tmp_path: Path, config: Path, output_dir: Path, *extra: str) -> str:
    script = tmp_path / "plain_rank_script.py"
    script.write_text(_PLAIN_RANK_SCRIPT)
    # No ACCELERATE_USE_CPU: with it Accelerate drops DeepSpeed (refused by ijepa_hf); without a GPU DeepSpeed
    # picks its CPU accelerator and a gloo process group by itself.
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)})
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
        "--main_process_port", str(free_port()), str(script),
        *tiny_argv(output_dir, "--checkpointing_steps", "2", *HELD_OUT, *extra, images=32, batch=4, steps=4),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("stage, mode", [(2, "replicated"), (3, "gathered")])
def test_deepspeed_on_two_cpu_processes_matches_one_process_and_resumes_bitwise(tmp_path, one_process, stage, mode):
    pytest.importorskip("deepspeed")
    if shutil.which("c++") is None:
        pytest.skip("DeepSpeed compiles a C++ op at first use and this machine has no C++ compiler")
    config = REPO_ROOT / "examples" / "accelerate_configs" / f"deepspeed_zero{stage}.yaml"
    two = tmp_path / f"zero{stage}"
    output = _launch_deepspeed(tmp_path, config, two)
    assert "DistributedType.DEEPSPEED" in output and f"EMA target encoder update: {mode}" in output
    assert "processes = 2" in output and f"'stage': {stage}" in output

    left, right = load_file(one_process / "model.safetensors"), load_file(two / "model.safetensors")
    assert left.keys() == right.keys()
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst < 1e-4, f"1-process and ZeRO-{stage} 2-process weights differ by {worst}"
    worst_target = max((left[k] - right[k]).abs().max().item() for k in left if k.startswith("target_encoder."))
    assert worst_target < 1e-4
    assert [r["loss"] for r in read_log(two)] == pytest.approx([r["loss"] for r in read_log(one_process)], abs=1e-5)
    assert _held_out(two) == pytest.approx(_held_out(one_process), abs=1e-5)
    encoder = load_file(two / "encoder" / "model.safetensors")
    assert all(torch.equal(v, right[f"target_encoder.{k}"]) for k, v in encoder.items())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(two / "step_2", resumed / "step_2")
    _launch_deepspeed(tmp_path, config, resumed, "--resume_from_checkpoint", "latest")
    again = load_file(resumed / "model.safetensors")
    different = [k for k in right if not torch.equal(right[k], again[k])]
    assert not different, f"{len(different)} tensors differ after the ZeRO-{stage} resume, e.g. {different[:3]}"


class _Payload:
    """Unpickling this creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_payload_in_an_engine_file_is_refused_before_loading(tmp_path):
    """DeepSpeed reads its checkpoint files with weights_only=False: they are checked with weights_only=True
    first, and nothing reaches accelerator.load_state."""
    from ijepa_hf.training.checkpointing import MANIFEST_NAME, CheckpointError, load_checkpoint

    marker = tmp_path / "executed"
    checkpoint = tmp_path / "step_2"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    torch.save({"module": {"w": torch.zeros(2)}}, checkpoint / "pytorch_model" / "mp_rank_00_model_states.pt")
    torch.save({"state": _Payload(marker)}, checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps({"format": 1, "run_id": "x", "step": 2, "files": files,
                                                        "state": {}}))
    loaded = []
    accelerator = SimpleNamespace(load_state=loaded.append, is_main_process=True, num_processes=1)
    with pytest.raises(CheckpointError, match="nothing in it was executed"):
        load_checkpoint(accelerator, checkpoint)
    assert not marker.exists() and not loaded
    (checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    torch.save({"state": {"step": torch.tensor(2.0)}}, checkpoint / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    files = {p.relative_to(checkpoint).as_posix(): p.stat().st_size for p in checkpoint.rglob("*")
             if p.is_file() and p.name != MANIFEST_NAME}
    (checkpoint / MANIFEST_NAME).write_text(json.dumps({"format": 1, "run_id": "x", "step": 2, "files": files,
                                                        "state": {}}))
    load_checkpoint(accelerator, checkpoint)
    assert loaded == [str(checkpoint)]


# ----------------------------------------------------------------------------------------------------------------
# Which EMA for which strategy (no launcher needed)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distributed_type, kwargs, expected", [
    ("NO", {}, EmaMode.REPLICATED),
    ("MULTI_CPU", {}, EmaMode.REPLICATED),
    ("DistributedType.MULTI_GPU", {}, EmaMode.REPLICATED),
    ("FSDP", {"fsdp_version": 2}, EmaMode.LOCAL_SHARDS),
    ("DEEPSPEED", {"zero_stage": 0}, EmaMode.REPLICATED),
    ("DEEPSPEED", {"zero_stage": 1}, EmaMode.REPLICATED),
    ("DEEPSPEED", {"zero_stage": 2}, EmaMode.REPLICATED),
    ("DEEPSPEED", {"zero_stage": 3}, EmaMode.GATHERED),
])
def test_ema_mode_for_each_strategy(distributed_type, kwargs, expected):
    assert ema_mode(distributed_type, **kwargs) is expected


def test_unsupported_strategies_are_refused_naming_the_fix():
    from accelerate.utils import DistributedType

    assert ema_mode(DistributedType.FSDP, fsdp_version=2) is EmaMode.LOCAL_SHARDS  # the enum works like its name
    with pytest.raises(ValueError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        ema_mode(DistributedType.FSDP, fsdp_version=1)
    with pytest.raises(ValueError, match="ZeRO stage must be 0, 1, 2 or 3, got None"):
        ema_mode("DEEPSPEED")
    with pytest.raises(ValueError, match="not supported by the I-JEPA pretraining loop"):
        ema_mode("MEGATRON_LM")


def _tiny_model() -> IJepaForPreTraining:
    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    torch.manual_seed(0)
    model = IJepaForPreTraining(config)
    with torch.no_grad():
        for p in model.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_gathered_ema_gathers_both_encoders_and_updates_on_rank_0_only(monkeypatch):
    """ZeRO-3: the update runs inside GatheredParameters over both encoders, modified by rank 0 (DeepSpeed then
    broadcasts rank 0's values and re-partitions); other ranks must not write into the gathered tensors."""
    import ijepa_hf.training.distributed as distributed

    calls = []

    class FakeGathered:
        def __init__(self, parameters, modifier_rank):
            calls.append((list(parameters), modifier_rank))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(distributed, "_gathered", FakeGathered)
    model = _tiny_model()
    reference = _tiny_model()
    reference.update_target_encoder(0.9)
    before = [p.clone() for p in model.target_encoder.parameters()]

    update_target_encoder(model, 0.9, EmaMode.GATHERED, is_main_process=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.target_encoder.parameters()))
    update_target_encoder(model, 0.9, EmaMode.GATHERED, is_main_process=True)
    assert all(torch.equal(a, b) for a, b in zip(reference.target_encoder.parameters(),
                                                  model.target_encoder.parameters()))
    expected = [*model.target_encoder.parameters(), *model.context_encoder.parameters()]
    assert len(calls) == 2 and all(rank == 0 for _, rank in calls)
    assert all(len(params) == len(expected) and all(a is b for a, b in zip(params, expected)) for params, _ in calls)

    # Read off the parameters (the Trainer callback has no accelerator): ZeRO-3 parameters carry ds_tensor.
    assert distributed.ema_mode_of(model) is EmaMode.REPLICATED
    for p in model.target_encoder.parameters():
        p.ds_tensor = p.detach()
    assert distributed.ema_mode_of(model) is EmaMode.GATHERED
    update_target_encoder(model, 0.9, is_main_process=True)
    assert len(calls) == 3

    monkeypatch.setattr(distributed, "_gathered", None)  # the other modes never gather
    for mode in (EmaMode.REPLICATED, EmaMode.LOCAL_SHARDS):
        update_target_encoder(model, 0.5, mode)


def test_unsharded_ema_is_unchanged():
    model = _tiny_model()
    target = [p.clone() for p in model.target_encoder.parameters()]
    context = [p.clone() for p in model.context_encoder.parameters()]
    model.update_target_encoder(0.996)
    for before, c, after in zip(target, context, model.target_encoder.parameters()):
        expected = before.clone()
        torch._foreach_mul_([expected], 0.996)
        torch._foreach_add_([expected], [c], alpha=1 - 0.996)
        assert torch.equal(after, expected)


def _fake_accelerator(distributed_type: str, **state: object) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType[distributed_type], mixed_precision="no",
                           state=SimpleNamespace(**state))


def test_configure_distributed_refuses_what_it_cannot_honour(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    from ijepa_hf.training.distributed import configure_distributed

    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    assert configure_distributed(_fake_accelerator("MULTI_CPU")) is EmaMode.REPLICATED

    sharded = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    with pytest.raises(ValueError, match="SHARDED_STATE_DICT is not supported.*unpickle.*FULL_STATE_DICT"):
        configure_distributed(_fake_accelerator("FSDP", fsdp_plugin=sharded))
    full = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    assert full.state_dict_type == StateDictType.FULL_STATE_DICT
    assert configure_distributed(_fake_accelerator("FSDP", fsdp_plugin=full)) is EmaMode.LOCAL_SHARDS
    fsdp1 = FullyShardedDataParallelPlugin(fsdp_version=1, state_dict_type="FULL_STATE_DICT")
    with pytest.raises(ValueError, match="FSDP version 1"):
        configure_distributed(_fake_accelerator("FSDP", fsdp_plugin=fsdp1))

    # A DeepSpeed config on CPU processes with ACCELERATE_USE_CPU=1: Accelerate would silently drop DeepSpeed.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RuntimeError, match="DeepSpeed config was launched with ACCELERATE_USE_CPU=1.*Launch without ACCELERATE_USE_CPU"):
        configure_distributed(_fake_accelerator("MULTI_CPU"))


def _deepspeed_accelerator(config: dict) -> SimpleNamespace:
    return _fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(deepspeed_config=config, zero_stage=None))


def test_deepspeed_settings_are_matched_or_refused():
    from ijepa_hf.training.distributed import _check_deepspeed, match_deepspeed_config, zero_stage

    auto = {"zero_optimization": {"stage": 2}, "gradient_clipping": "auto", "gradient_accumulation_steps": "auto"}
    accelerator = _deepspeed_accelerator(auto)
    assert zero_stage(accelerator) == 2
    match_deepspeed_config(accelerator, gradient_accumulation_steps=3, max_grad_norm=None)
    assert auto["gradient_clipping"] == 0.0 and auto["gradient_accumulation_steps"] == 3  # not Accelerate's 1.0
    explicit = {"gradient_clipping": 1.0, "gradient_accumulation_steps": 1}
    match_deepspeed_config(_deepspeed_accelerator(explicit), gradient_accumulation_steps=1, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gradient_clipping 1.0 but the run has --max_grad_norm 0"):
        match_deepspeed_config(_deepspeed_accelerator(explicit), gradient_accumulation_steps=1, max_grad_norm=None)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 1 but the run has --gradient_accumulation_"):
        match_deepspeed_config(_deepspeed_accelerator(explicit), gradient_accumulation_steps=2, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="--skip_nonfinite_steps is not supported with DeepSpeed"):
        match_deepspeed_config(_deepspeed_accelerator({}), gradient_accumulation_steps=1, max_grad_norm=None,
                               skip_nonfinite_steps=2)

    _check_deepspeed({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}})
    for key in ("bf16", "fp16"):
        with pytest.raises(ValueError, match=f"DeepSpeed {key} is not supported.*rounded away"):
            _check_deepspeed({"zero_optimization": {"stage": 2}, key: {"enabled": True}})
    with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
        _check_deepspeed({"zero_optimization": {"stage": 3}})
    _check_deepspeed({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}})


def test_bf16_rounds_the_ema_step_away():
    """Why DeepSpeed's bf16 is refused: the EMA step of a bf16 target encoder is lost entirely."""
    target = torch.full((1000,), 0.5)
    context = target + 0.01 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
    m = 0.996
    fp32 = target * m + context * (1 - m)
    bf16 = (target.bfloat16() * m + context.bfloat16() * (1 - m)).bfloat16()
    assert not torch.equal(fp32, target) and torch.equal(bf16.float(), target)


# ----------------------------------------------------------------------------------------------------------------
# Masks of a multi-process run
# ----------------------------------------------------------------------------------------------------------------

# Records every mask batch the loop's collator hands out on this rank.
_MASK_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
import ijepa_hf.masking as masking
from ijepa_hf.training import parse_args, pretrain

recorded = []
original = masking.IJepaMaskCollator.sample_batch

def sample_batch(self, batch_size, batch_index=None):
    if batch_index is None:
        batch_index = self.step
        self.set_step(batch_index + 1)
    masks = original(self, batch_size, batch_index=batch_index)
    if batch_size > 1:  # not the dummy one-image batch
        recorded.append({"batch_index": batch_index, "context": masks["context_mask"],
                         "targets": masks["target_masks"]})
    return masks

masking.IJepaMaskCollator.sample_batch = sample_batch
result = pretrain(parse_args(sys.argv[1:]))
torch.save(recorded, f"{result.output_dir}/masks_rank{dist.get_rank()}.pt")
dist.destroy_process_group()
"""


def _launch_ddp(tmp_path: Path, script_text: str, output_dir: Path, *extra: str, batch: int, steps: int,
                succeed: bool = True) -> str:
    script = tmp_path / "mask_rank_script.py"
    script.write_text(script_text)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(script), *tiny_argv(output_dir, *extra, images=32, batch=batch, steps=steps),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (proc.returncode == 0) == succeed, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def test_official_mode_masks_of_each_process_are_the_official_per_process_sampling(tmp_path):
    """The official code runs one collator per process on that process's own batch (block sizes seeded by the
    iteration, contexts equalised within the per-process batch). In official mode each rank of a 2-process run
    gets exactly the masks the package's official sampler gives one process with the per-process batch; in fixed
    mode each rank gets its rows of the global batch's masks (a 2-process run sees the masks of a 1-process run)."""
    from ijepa_hf.masking import IJepaMaskCollator

    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    batch, steps = 4, 3
    for mode in ("official", "fixed"):
        out = tmp_path / mode
        _launch_ddp(tmp_path, _MASK_RANK_SCRIPT, out, "--mask_mode", mode, "--checkpointing_steps", "2",
                    batch=batch, steps=steps)
        config.mask_mode = mode
        single = IJepaMaskCollator.from_config(config, seed=0)  # one process, the run's seed
        ranks = [torch.load(out / f"masks_rank{r}.pt") for r in (0, 1)]
        for rank, records in enumerate(ranks):
            # (Accelerate's loader collates one batch ahead, hence possibly one more than the steps.)
            assert [r["batch_index"] for r in records][:steps] == list(range(steps))
            for record in records:
                if mode == "official":
                    context, targets = single.sample_masks(batch, batch_index=record["batch_index"])
                else:
                    context, targets = single.sample_masks(2 * batch, batch_index=record["batch_index"])
                    context, targets = (context[rank * batch:(rank + 1) * batch],
                                        targets[rank * batch:(rank + 1) * batch])
                assert torch.equal(record["context"], context), (mode, rank, record["batch_index"])
                assert torch.equal(record["targets"], targets), (mode, rank, record["batch_index"])

    # A 2-process official-mode checkpoint of an earlier version (no "mask_sampling": its masks were rows of the
    # global batch) cannot be continued exactly: refused.
    old = tmp_path / "earlier"
    old.mkdir()
    shutil.copytree(tmp_path / "official" / "step_2", old / "step_2")
    manifest = json.loads((old / "step_2" / "checkpoint.json").read_text())
    assert manifest["state"]["mask_collator"].pop("mask_sampling") == "per_process"
    assert "mask_sampling" not in manifest["state"]  # one home: the collator's state
    (old / "step_2" / "checkpoint.json").write_text(json.dumps(manifest))
    output = _launch_ddp(tmp_path, _MASK_RANK_SCRIPT, old, "--mask_mode", "official", "--checkpointing_steps", "2",
                         "--resume_from_checkpoint", "latest", batch=batch, steps=steps, succeed=False)
    assert "Cannot resume exactly: the checkpoint's masks were sampled global" in output


OFFICIAL_MIRROR = Path("/work/.mirror/facebookresearch+ijepa/repo")


def test_per_process_official_masks_follow_the_official_collator_at_the_per_process_batch(tmp_path):
    """Against the official MaskCollator (imported at run time from a temporary checkout of a local mirror; never
    part of this repository): at the per-process batch B the official context length (equalised to the batch's
    shortest) is what the package's per-process official sampling gives, and clearly not what sampling the global
    batch of 2 x B would give. Its RNG streams differ from the package's, so the comparison is of means."""
    if not (OFFICIAL_MIRROR / "HEAD").exists():
        pytest.skip("no local mirror of the official I-JEPA repository")
    checkout = tmp_path / "official"
    checkout.mkdir()
    archive = subprocess.run(["git", f"--git-dir={OFFICIAL_MIRROR}", "archive", "HEAD", "src/masks"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
    sys.path.insert(0, str(checkout))
    try:
        from src.masks.multiblock import MaskCollator  # the official collator
    finally:
        sys.path.remove(str(checkout))
        for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
            del sys.modules[name]

    from ijepa_hf.masking import IJepaMaskCollator

    batch, collations = 8, 600
    settings = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1,
                    npred=4, min_keep=10, allow_overlap=False)  # the shipped configs' mask values
    state = torch.get_rng_state()
    torch.manual_seed(0)  # the official positions come from the global RNG
    official = MaskCollator(input_size=(224, 224), patch_size=16, **settings)
    official_lengths = torch.tensor([float(official([torch.zeros(1)] * batch)[1][0].shape[1])
                                     for _ in range(collations)])
    torch.set_rng_state(state)
    ours = IJepaMaskCollator(224, 16, mask_mode="official", num_target_blocks=4, context_scale=(0.85, 1.0),
                             target_scale=(0.15, 0.2), target_aspect_ratio=(0.75, 1.5), min_keep=10,
                             allow_overlap=False)

    def mean_context(size: int) -> float:
        return sum(ours.sample_masks(size, batch_index=i)[0].shape[1] for i in range(collations)) / collations

    per_process, global_batch = mean_context(batch), mean_context(2 * batch)
    reference = official_lengths.mean().item()
    assert abs(per_process - reference) < 1.5, (per_process, reference)  # ~4 standard errors
    assert reference - global_batch > 2.5, (global_batch, reference)


# ----------------------------------------------------------------------------------------------------------------
# Several nodes (simulated: two "nodes" of one CPU process each on this machine)
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_node_launch_commands_match_one_process(tmp_path, one_process, launcher):
    """The multi-node commands of docs/distributed.md, one launcher per node with its --machine_rank/--node_rank,
    here both nodes on localhost."""
    script = tmp_path / "plain_rank_script.py"
    script.write_text(_PLAIN_RANK_SCRIPT)
    out, port = tmp_path / "nodes", str(free_port())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    procs = []
    for node in (0, 1):
        if launcher == "accelerate":
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                       "--num_processes", "2", "--machine_rank", str(node), "--main_process_ip", "127.0.0.1",
                       "--main_process_port", port, "--rdzv_backend", "static", "--same_network",
                       "--mixed_precision", "no", "--dynamo_backend", "no"]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                       "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
        command += [str(script), *tiny_argv(out, images=32, batch=4, steps=4)]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      cwd=tmp_path))
    try:
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:  # a node whose peer failed would wait for it
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), "\n\n".join(o[-3000:] for o in outputs)
    assert "processes = 2" in outputs[0]
    left, right = load_file(one_process / "model.safetensors"), load_file(out / "model.safetensors")
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst < 1e-4, f"1-process and 2-node weights differ by {worst}"

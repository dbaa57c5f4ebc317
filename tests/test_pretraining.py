"""Tests of the pretraining loop (ijepa_hf.training.loop), the Trainer path (ijepa_hf.training.trainer) and the
example's argument handling. Every run uses a tiny model (32 px, patch 8, width 32, depth 2) on CPU."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ijepa_hf import IJepaEncoderModel, IJepaPretrainingConfig, IJepaForPreTraining
from ijepa_hf.data import build_pretraining_data
from ijepa_hf.configuration_ijepa_hf import parse_config_overrides
from ijepa_hf.training import PretrainingArguments, build_config, parse_args, pretrain
from ijepa_hf.training.checkpointing import latest_checkpoint

from tiny import (REPO_ROOT, TINY_OVERRIDES, assert_same_weights, free_port, read_log, run,
                  save_meta_derived_model, tiny_argv)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: in-process runs on one thread


# ----------------------------------------------------------------------------------------------------------------
# A short run and its outputs
# ----------------------------------------------------------------------------------------------------------------


def test_short_run_writes_log_tensorboard_models_and_cards(tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForPreTraining

    out = tmp_path / "run"
    result = run(out, "--with_tracking", steps=6)

    assert result.global_step == result.total_steps == 6
    assert math.isfinite(result.final_loss) and result.bad_images == 0 and result.images_per_s > 0
    rows = read_log(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        assert {"step", "loss", "lr", "weight_decay", "momentum", "images_per_s", "target_std", "pred_std",
                "target_rankme", "target_cosine"} <= row.keys()
        assert math.isfinite(row["loss"]) and row["target_std"] > 0 and row["pred_std"] > 0
        assert 1.0 <= row["target_rankme"] <= 8 and -1.0 <= row["target_cosine"] < 1.0
    # Official schedules: LR ends at final_lr, weight decay rises towards 0.4, EMA momentum increases from 0.996.
    assert rows[-1]["lr"] == pytest.approx(1e-6) and rows[-1]["weight_decay"] == pytest.approx(0.4)
    assert 0.996 < rows[0]["momentum"] < rows[-1]["momentum"] < 1.0
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard event file"
    assert result.log_file == str(out / "train_log.jsonl")

    model = AutoModelForPreTraining.from_pretrained(out)
    assert isinstance(model, IJepaForPreTraining)
    encoder = AutoModel.from_pretrained(out / "encoder")
    assert isinstance(encoder, IJepaEncoderModel)
    for key, value in model.target_encoder.state_dict().items():
        assert torch.equal(value, encoder.state_dict()[key]), key
    # The EMA moved the target encoder away from the context encoder (both started equal).
    context = model.context_encoder.state_dict()
    assert any(not torch.equal(v, context[k]) for k, v in model.target_encoder.state_dict().items())
    processor = AutoImageProcessor.from_pretrained(out / "encoder")
    assert processor.image_mean == pytest.approx([0.485, 0.456, 0.406])
    for card in (out / "README.md", out / "encoder" / "README.md"):
        text = card.read_text()
        assert "procedural-shapes" in text and "6 of 6" in text and "warm-up" in text, card
    assert 'subfolder="encoder"' in (out / "encoder" / "README.md").read_text()
    assert result.model is not None and result.to_dict()["global_step"] == 6


@pytest.mark.parametrize("option, value", [("--collapse_threshold", "-1"), ("--collapse_threshold", "nan"),
                                           ("--collapse_max_cosine", "2"), ("--collapse_max_cosine", "-1.5")])
def test_a_collapse_threshold_that_cannot_mean_anything_is_refused(tmp_path, option, value):
    """A std below a negative threshold, or a cosine above 2, never happens: the warning was off without a word
    (and a cosine threshold below -1 warned at the first row of any run). Refused, naming the option and its range;
    0 and 1 turn a test off, -1 makes it warn at once."""
    from ijepa_hf.training.metrics import CollapseMonitor

    with pytest.raises(ValueError, match=rf"{option.lstrip('-')} must be"):
        parse_args(["--output_dir", str(tmp_path), option, value])
    with pytest.raises(ValueError, match=rf"{option.lstrip('-')} must be"):
        CollapseMonitor(**{"min_std" if "threshold" in option else "max_cosine": float(value)})
    for extreme in ("0", "1", "-1") if "cosine" in option else ("0",):
        parse_args(["--output_dir", str(tmp_path), option, extreme])


def test_collapse_statistics_and_warning(tmp_path, caplog):
    from types import SimpleNamespace

    from ijepa_hf.training.metrics import collapse_statistics

    same = torch.randn(1, 16, 32).expand(4, 16, 32)  # every image gets the same features: complete collapse
    varied = torch.randn(4, 16, 32)
    tokens = torch.randn(8, 3, 32)
    collapsed = collapse_statistics(SimpleNamespace(target_hidden_state=same, targets=tokens, predictions=tokens))
    healthy = collapse_statistics(SimpleNamespace(target_hidden_state=varied, targets=tokens, predictions=tokens))
    assert collapsed["target_std"] < 1e-6 < 0.1 < healthy["target_std"]
    assert collapsed["pred_std"] == pytest.approx(collapsed["target_token_std"])

    with caplog.at_level("WARNING", logger="ijepa_hf.training.metrics"):
        run(tmp_path / "run", "--collapse_threshold", "100", steps=2)  # any real std is below 100
    assert "Possible representation collapse at step 2" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------------------


def _interrupted_run(straight: Path, resumed: Path, *extra: str) -> None:
    """Simulate a crash after step 4: start a new run from a copy of step_4 only, and resume it to step 8."""
    resumed.mkdir(parents=True)
    shutil.copytree(straight / "step_4", resumed / "step_4")
    result = run(resumed, "--resume_from_checkpoint", "latest", *extra)
    assert result.resumed_from == str(resumed / "step_4") and result.global_step == 8


def test_resume_latest_is_bitwise_exact(straight_run, tmp_path):
    assert latest_checkpoint(straight_run).path == straight_run / "step_8"
    resumed = tmp_path / "resumed"
    _interrupted_run(straight_run, resumed, "--checkpointing_steps", "4")
    assert_same_weights(straight_run, resumed)
    losses = {r["step"]: r["loss"] for r in read_log(straight_run)}
    assert [(r["step"], r["loss"]) for r in read_log(resumed)] == [(s, losses[s]) for s in (6, 8)]


def test_resume_with_dataloader_workers_is_bitwise_exact(straight_run, tmp_path):
    # Crops and masks depend on sample / batch positions only, so 2 workers reproduce the 0-worker run too.
    workers = tmp_path / "workers"
    run(workers, "--checkpointing_steps", "4", "--num_workers", "2")
    assert_same_weights(straight_run, workers)
    resumed = tmp_path / "resumed"
    _interrupted_run(workers, resumed, "--num_workers", "2")
    assert_same_weights(straight_run, resumed)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("randomness", [",encoder.drop_path_rate=0.2",
                                        ",sigreg_weight=0.05,regularized_embeddings=context_tokens"])
def test_resume_is_bitwise_exact_when_the_step_draws_random_numbers(tmp_path, randomness):
    """A step that draws from torch's global generator (DropPath, SIGReg's directions) gave a resumed run other
    numbers than the uninterrupted one: the restored generator then drew the data loader's base seed when the
    resumed epoch's iterator was made, a draw the uninterrupted run had made at the epoch's start. Resumed mid-epoch
    (step 4) and at an epoch's end (step 6: 6 batches per epoch), with the held-out loss every 2 updates, the runs now
    end bitwise alike."""
    overrides = TINY_OVERRIDES + randomness
    straight = tmp_path / "straight"
    run(straight, "--checkpointing_steps", "2", "--config_overrides", overrides, "--eval_steps", "2")
    for step in (4, 6):
        resumed = tmp_path / f"resumed_{step}"
        resumed.mkdir()
        shutil.copytree(straight / f"step_{step}", resumed / f"step_{step}")
        run(resumed, "--checkpointing_steps", "2", "--config_overrides", overrides, "--eval_steps", "2",
            "--resume_from_checkpoint", "latest")
        assert_same_weights(straight, resumed)


def test_model_name_or_path_continues_from_saved_weights(straight_run, tmp_path):
    # With every rate at 0 (LR, weight decay, 1 - EMA momentum) one step must leave the loaded weights untouched.
    out = tmp_path / "continued"
    zero = ["--learning_rate", "0", "--start_lr", "0", "--final_lr", "0", "--weight_decay", "0",
            "--final_weight_decay", "0", "--ema_momentum", "1,1"]
    pretrain(parse_args(["--model_name_or_path", str(straight_run), "--output_dir", str(out),
                         "--embedded_num_images", "8", "--per_device_train_batch_size", "8", "--max_train_steps", "1",
                         *zero]))
    assert_same_weights(straight_run, out)
    assert json.loads((out / "config.json").read_text())["encoder_config"]["hidden_size"] == 32


def test_a_saved_model_continues_at_another_resolution(straight_run, tmp_path):
    """`--model_name_or_path M --image_size S` (continue pretraining at another resolution: the official 224 px
    weights on 448 px images, say) stopped with transformers' size-mismatch error on the sin-cos position tables,
    which follow the patch grid and hold nothing learned. They are recomputed for the new grid; every learned weight
    is the saved one (with every rate at 0, unchanged after an update)."""
    from ijepa_hf import sincos_position_embeddings

    out = tmp_path / "larger"
    zero = ["--learning_rate", "0", "--start_lr", "0", "--final_lr", "0", "--weight_decay", "0",
            "--final_weight_decay", "0", "--ema_momentum", "1,1"]
    pretrain(parse_args(["--model_name_or_path", str(straight_run), "--output_dir", str(out), "--image_size", "64",
                         "--embedded_num_images", "8", "--per_device_train_batch_size", "8", "--max_train_steps", "1",
                         *zero]))
    before, after = load_file(straight_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    for key, value in after.items():
        if key.endswith("pos_embed"):
            assert value.shape[1] == 64 and torch.equal(value[0], sincos_position_embeddings(value.shape[2], (8, 8)))
        else:
            assert torch.equal(value, before[key]), key
    config = json.loads((out / "config.json").read_text())
    assert config["encoder_config"]["image_size"] == config["predictor_config"]["image_size"] == 64


def test_a_training_checkpoint_given_as_the_model_to_continue_names_the_option_that_continues_it(straight_run):
    """`--model_name_or_path run/step_4` (a checkpoint of pretrain.py, which holds no config.json) was refused as a
    folder without a config, with no word of what the folder is: the error now says it is a training checkpoint and
    names --resume_from_checkpoint, which continues it, and the run's final model, which a new run can start from."""
    with pytest.raises(ValueError, match=r"step_4 has no config\.json: it is a training checkpoint of pretrain\.py, "
                                         r"not a saved model\. .*--resume_from_checkpoint \S*step_4 .*final model"):
        build_config(parse_args(["--model_name_or_path", str(straight_run / "step_4"), "--output_dir", "o"]))


def test_continuing_a_saved_model_under_another_architecture_is_a_clear_error(straight_run, tmp_path):
    """An override that changes the shape of the saved weights ended in transformers' RuntimeError "You set
    `ignore_mismatched_sizes` to `False`", an option the user never set; the error now names the weights that do
    not fit and what to do."""
    argv = ["--model_name_or_path", str(straight_run), "--output_dir", str(tmp_path / "wider"), "--config_overrides",
            "encoder.hidden_size=64", "--embedded_num_images", "8", "--per_device_train_batch_size", "8",
            "--max_train_steps", "1"]
    with pytest.raises(ValueError, match=r"the config changes the shape of the saved weights \(\d+ tensors, e\.g\. "
                                         r"context_encoder\.\S+: \(32,\) saved, \(64,\) by the config"):
        pretrain(parse_args(argv))
    assert not (tmp_path / "wider").exists()


def test_resume_latest_without_checkpoint_starts_fresh(tmp_path):
    result = run(tmp_path / "fresh", "--resume_from_checkpoint", "latest", steps=2)
    assert result.resumed_from is None and result.global_step == 2
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        run(tmp_path / "x", "--resume_from_checkpoint", str(tmp_path / "missing"), steps=2)


# ----------------------------------------------------------------------------------------------------------------
# Data parallel: 2 CPU processes == 1 process with the same global batch
# ----------------------------------------------------------------------------------------------------------------

_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from ijepa_hf.training import parse_args, pretrain
result = pretrain(parse_args(sys.argv[1:]))
rank = dist.get_rank() if dist.is_initialized() else 0
state = {k: v.detach().clone() for k, v in result.model.state_dict().items() if k.startswith("target_encoder.")}
torch.save(state, f"{result.output_dir}/target_rank{rank}.pt")
"""


HELD_OUT = ("--eval_steps", "2", "--max_eval_samples", "16")


def test_two_cpu_processes_match_one_process(tmp_path):
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    two = tmp_path / "two"
    # accelerate 1.15: `--cpu --num_processes 2` silently runs ONE process (its multi-CPU launcher needs mpirun).
    # `--multi_gpu` launches 2 processes through torchrun, and ACCELERATE_USE_CPU=1 (which `--cpu` would set) makes
    # Accelerate build a gloo CPU process group (MULTI_CPU) instead of looking for GPUs.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script),
        *tiny_argv(two, "--checkpointing_steps", "2", *HELD_OUT, images=32, batch=4, steps=4),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    assert "processes = 2" in proc.stderr + proc.stdout

    one = tmp_path / "one"
    run(one, *HELD_OUT, images=32, batch=8, steps=4)  # global batch 8 = 2 x 4

    left, right = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    worst = max((left[k] - right[k]).abs().max().item() for k in left)
    assert worst < 1e-4, f"1-process and 2-process weights differ by {worst}"
    losses_one = [r["loss"] for r in read_log(one)]
    losses_two = [r["loss"] for r in read_log(two)]
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    # the held-out loss: each rank reads its share of the same global batches, with the same masks
    held_out_one, held_out_two = ({r["step"]: r["eval_loss"] for r in read_log(run_dir) if "eval_loss" in r}
                                  for run_dir in (one, two))
    assert sorted(held_out_one) == [2, 4] and held_out_two == pytest.approx(held_out_one, abs=1e-5)
    rank0, rank1 = (torch.load(two / f"target_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0), \
        "EMA target encoders differ between ranks"

    # The 2-process run continued on 1 process: refused unless asked for, and then only with the same global batch
    resume = ("--resume_from_checkpoint", str(two / "step_2"))
    with pytest.raises(ValueError, match="1 processes, the checkpoint was trained on 2 .*--allow_process_count_change"):
        run(tmp_path / "refused", *resume, images=32, batch=8, steps=4)
    with pytest.raises(ValueError, match="global batch would be 4, the checkpoint's is 8.*per_device_train_batch_size 8"):
        run(tmp_path / "refused", *resume, "--allow_process_count_change", images=32, batch=4, steps=4)
    moved = tmp_path / "moved"
    result = run(moved, *resume, "--allow_process_count_change", images=32, batch=8, steps=4)
    assert result.resumed_from == str(two / "step_2") and result.global_step == 4
    continued = load_file(moved / "model.safetensors")
    worst = max((left[k] - continued[k]).abs().max().item() for k in left)
    assert worst < 1e-4, f"continued on 1 process, the weights differ from the 1-process run's by {worst}"


# ----------------------------------------------------------------------------------------------------------------
# Trainer path
# ----------------------------------------------------------------------------------------------------------------


def test_trainer_ema_callback_follows_the_ema_formula(tmp_path):
    from transformers import TrainerCallback, TrainingArguments

    from ijepa_hf.data import PretrainTransform, ProceduralShapes
    from ijepa_hf.masking import IJepaMaskCollator
    from ijepa_hf.training.schedules import ema_momentum_value
    from ijepa_hf.training.trainer import IJepaTrainer

    torch.manual_seed(0)
    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    model = IJepaForPreTraining(config)
    collator = IJepaMaskCollator.from_config(config, seed=0)
    dataset = ProceduralShapes(16, image_size=32, transform=PretrainTransform(32))

    class Recorder(TrainerCallback):
        """Snapshots around the optimizer step; added after the EMA callback, so it sees the updated target."""

        def __init__(self) -> None:
            self.records: list[dict] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.before = [p.detach().clone() for p in model.target_encoder.parameters()]

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.records.append({
                "step": state.global_step, "max_steps": state.max_steps, "before": self.before,
                "context": [p.detach().clone() for p in model.context_encoder.parameters()],
                "after": [p.detach().clone() for p in model.target_encoder.parameters()],
            })

    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
        warmup_steps=1, weight_decay=0.04, remove_unused_columns=False, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0,
    )
    trainer = IJepaTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                           final_weight_decay=0.4)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.train()

    assert [r["step"] for r in recorder.records] == [0, 1, 2]
    for record in recorder.records:
        m = ema_momentum_value(record["step"], record["max_steps"], 0.996, 1.0)
        for before, context, after in zip(record["before"], record["context"], record["after"]):
            torch.testing.assert_close(after, before * m + context * (1 - m), rtol=0, atol=1e-7)
    assert recorder.records[0]["after"][0].ne(recorder.records[0]["before"][0]).any()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    # The optimizer is the official one: decay groups end at the cosine's final value, no-decay groups at 0.
    groups = trainer.optimizer.param_groups
    assert {g["weight_decay"] for g in groups if g.get("WD_exclude")} == {0.0}
    assert all(g["weight_decay"] > 0.04 for g in groups if not g.get("WD_exclude"))
    assert collator.step >= 3  # the collator was used for every batch


# ----------------------------------------------------------------------------------------------------------------
# Bad data
# ----------------------------------------------------------------------------------------------------------------


def _make_messy_folder(root: Path) -> None:
    root.mkdir()
    generator = torch.Generator().manual_seed(0)

    def pixels(channels: int) -> "Image.Image":
        array = torch.randint(0, 256, (40, 48, channels), generator=generator, dtype=torch.uint8).numpy()
        return Image.fromarray(array.squeeze(-1) if channels == 1 else array)

    for i in range(3):
        pixels(3).save(root / f"rgb_{i}.png")
    pixels(1).save(root / "gray.png")  # mode L
    Image.fromarray(torch.randint(0, 256, (40, 48, 4), generator=generator, dtype=torch.uint8).numpy(),
                    mode="RGBA").save(root / "rgba.png")
    pixels(3).convert("CMYK").save(root / "cmyk.jpg")
    good = (root / "rgb_0.png").read_bytes()
    (root / "corrupt.png").write_bytes(good[: len(good) // 3])  # truncated: the header parses, decoding fails


def test_bad_and_odd_images_are_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    _make_messy_folder(folder)
    # Batch size 1: the corrupt image makes a batch with no good image at all (the zero-loss path).
    result = pretrain(parse_args([
        "--train_dir", str(folder), "--output_dir", str(tmp_path / "out"), "--config_overrides", TINY_OVERRIDES,
        "--per_device_train_batch_size", "1", "--num_train_epochs", "1", "--logging_steps", "1",
    ]))
    assert result.global_step == 7 and result.bad_images == 1
    rows = read_log(tmp_path / "out")
    assert sum(r["skipped_batches"] for r in rows) == 1
    assert all(math.isfinite(r["loss"]) for r in rows) and len(rows) == 6  # the empty step logs no loss
    assert f"image folder {folder}" in (tmp_path / "out" / "README.md").read_text()


def test_data_without_any_readable_image_is_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i in range(2):
        (folder / f"bad_{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    with pytest.raises(RuntimeError, match="no readable image"):
        pretrain(parse_args(["--train_dir", str(folder), "--output_dir", str(tmp_path / "out"),
                             "--config_overrides", TINY_OVERRIDES, "--per_device_train_batch_size", "1"]))


def test_streaming_image_folder_trains_and_skips_bad_files(tmp_path):
    folder = tmp_path / "images"
    _make_messy_folder(folder)
    result = pretrain(parse_args([
        "--train_dir", str(folder), "--streaming", "--shuffle_buffer_size", "4", "--output_dir", str(tmp_path / "out"),
        "--config_overrides", TINY_OVERRIDES, "--per_device_train_batch_size", "2", "--max_train_steps", "5",
        "--logging_steps", "1",
    ]))
    # 6 good images per pass in batches of 2: 3 steps per epoch, so 5 steps run over two epochs of the stream.
    assert result.global_step == 5 and result.bad_images == 2  # the corrupt file, seen once per epoch
    rows = read_log(tmp_path / "out")
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["loader_images_per_s"] > 0 for r in rows)  # a stream's examples say how long they took too


# ----------------------------------------------------------------------------------------------------------------
# Arguments and config overrides
# ----------------------------------------------------------------------------------------------------------------


def test_a_failed_start_leaves_the_output_folder_as_it_was(tmp_path):
    out = tmp_path / "run"
    typo = TINY_OVERRIDES + ",encoder.hiden_size=64"
    with pytest.raises(ValueError, match="hiden_size"):
        pretrain(parse_args(["--output_dir", str(out), "--config_overrides", typo, "--max_train_steps", "2"]))
    missing = tmp_path / "missing_images"
    missing.mkdir()
    with pytest.raises(Exception, match="missing_images|image"):
        run(out, "--train_dir", str(missing), steps=2)
    with pytest.raises(OSError, match="no_model"):
        run(out, "--model_name_or_path", str(tmp_path / "no_model"), "--config_overrides", "", steps=2)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert run(out, steps=2).global_step == 2  # the corrected command is not refused


def test_parse_config_overrides_values_and_lists():
    parsed = parse_config_overrides(
        "num_target_blocks=3, encoder.hidden_size=64,target_scale=[0.1,0.25],mask_mode=official,allow_overlap=true,"
        "smooth_l1_beta=0.5"
    )
    assert parsed == {"num_target_blocks": 3, "encoder.hidden_size": 64, "target_scale": [0.1, 0.25],
                      "mask_mode": "official", "allow_overlap": True, "smooth_l1_beta": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_config_overrides("num_target_blocks")


def test_update_from_string_sub_configs_follow_and_errors():
    import copy

    base = IJepaPretrainingConfig.from_preset("vit_tiny_patch16_224")
    config = copy.deepcopy(base)
    config.update_from_string("encoder.hidden_size=96,encoder.num_attention_heads=2,encoder.image_size=64,"
                              "predictor.num_hidden_layers=2,min_keep=4,target_scale=[0.1,0.2]")
    assert config.encoder_config.hidden_size == 96 and config.encoder_config.intermediate_size == 384
    # The predictor follows the encoder's width and grid unless told otherwise.
    assert config.predictor_config.encoder_hidden_size == 96 and config.predictor_config.image_size == 64
    assert config.predictor_config.num_hidden_layers == 2 and config.target_scale == [0.1, 0.2]
    assert base.encoder_config.hidden_size == 192  # the copy changed, not the preset

    typo = r"unknown config key 'encoder\.hiden_size'.*Did you mean encoder\.hidden_size"
    for text, match in (("encoder.hiden_size=64", typo), ("num_targets=2", "unknown config key 'num_targets'"),
                        ("decoder.hidden_size=2", "unknown config prefix 'decoder'"),
                        ("encoder.hidden_size=wide", "hidden_size.*expected int"),  # the configs' own type check (@strict)
                        ("encoder.hidden_size=100", "divisible"),  # 3 heads: the config's own validation
                        ("min_keep=1,min_keep=2", "given twice")):
        with pytest.raises(ValueError, match=match):
            base.update_from_string(text)
    assert base.to_dict() == IJepaPretrainingConfig.from_preset("vit_tiny_patch16_224").to_dict()  # unchanged


def test_build_config_from_preset_with_image_size_mask_mode_and_ema(tmp_path):
    args = PretrainingArguments(config_name="vit_tiny_patch16_224", image_size=64, mask_mode="official",
                                ema_momentum="0.99,1.0", output_dir=str(tmp_path))
    config = build_config(args)
    assert config.encoder_config.image_size == 64 and config.predictor_config.image_size == 64
    assert config.mask_mode == "official" and config.ema_momentum == [0.99, 1.0]
    with pytest.raises(ValueError, match="neither a preset"):
        build_config(PretrainingArguments(config_name=str(tmp_path / "nope"), output_dir=str(tmp_path)))


def test_image_size_and_config_overrides_are_validated_together(tmp_path):
    """`--image_size 96 --config_overrides encoder.patch_size=12` is a valid model (96 = 8 x 12): the overrides and the
    size are one change, validated once, not the patch size first against the default 224 px (not a multiple of 12,
    with advice to pick 216 or 228). On the embedded demo the same holds for its 96 px."""
    args = PretrainingArguments(image_size=96, config_overrides="encoder.patch_size=12", output_dir=str(tmp_path))
    config = build_config(args)
    assert (config.encoder_config.image_size, config.encoder_config.patch_size) == (96, 12)
    assert (config.predictor_config.image_size, config.predictor_config.patch_size) == (96, 12)
    demo = build_config(parse_args(["--config_overrides", "encoder.patch_size=12"])).encoder_config
    assert (demo.image_size, demo.patch_size, demo.hidden_size) == (96, 12, 128)
    # An invalid result is still refused, naming the sizes the user gave.
    with pytest.raises(ValueError, match="`image_size` 100 is not divisible by `patch_size` 12"):
        build_config(PretrainingArguments(image_size=100, config_overrides="encoder.patch_size=12",
                                          output_dir=str(tmp_path)))


def test_arguments_validation_and_json_file(tmp_path):
    with pytest.raises(ValueError, match="checkpointing_steps"):
        PretrainingArguments(checkpointing_steps="often")
    with pytest.raises(ValueError, match="--streaming needs --max_train_steps"):
        PretrainingArguments(streaming=True, dataset_name="x")
    with pytest.raises(ValueError, match="ema_momentum"):
        PretrainingArguments(ema_momentum="0.9")
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": "o", "max_train_steps": 5, "checkpointing_steps": "epoch"}))
    args = parse_args([str(path)])
    assert args.max_train_steps == 5 and args.checkpointing_steps == "epoch" and args.uses_embedded_data


def test_config_overrides_on_the_embedded_demo_change_the_demos_model():
    """`--config_overrides` alone changes the demo's small model (the user's fields win), instead of replacing it by
    the default ViT-B/16 at 224 px, a model hours long on the demo's CPU budget."""
    demo = build_config(parse_args([]))
    config = build_config(parse_args(["--config_overrides", "predictor.num_hidden_layers=2"]))
    assert config.encoder_config.to_dict() == demo.encoder_config.to_dict() and config.min_keep == 4
    assert config.predictor_config.num_hidden_layers == 2  # the user's field wins over the demo's small recipe
    assert config.predictor_config.hidden_size == demo.predictor_config.hidden_size == 128  # the recipe's width
    assert tuple(config.ema_momentum) == (0.99, 0.999)
    # A field the demo sets too: the user's value, the demo's other fields kept.
    args = parse_args(["--config_overrides", "encoder.hidden_size=192,encoder.num_attention_heads=3"])
    encoder = build_config(args).encoder_config
    assert (encoder.hidden_size, encoder.num_attention_heads, encoder.patch_size, encoder.image_size) == (192, 3, 8, 96)
    assert parse_config_overrides(args.config_overrides)["encoder.hidden_size"] == 192
    # The run logs what the demo filled in: its model's fields that the user did not set, not the user's.
    filled = parse_config_overrides(args.demo_defaults_applied["config_overrides"])
    assert "encoder.hidden_size" not in filled and filled["encoder.patch_size"] == 8
    assert args.demo_defaults_applied["recipe"] == "small"
    # The user's override of a field the demo sets with a flag replaces that flag (no "given twice" error).
    config = build_config(parse_args(["--config_overrides", "encoder.image_size=64,ema_momentum=[0.996,1.0]"]))
    assert config.encoder_config.image_size == 64 and config.encoder_config.patch_size == 8
    assert tuple(config.ema_momentum) == (0.996, 1.0)
    # A model source replaces the demo's model, overrides and all.
    args = parse_args(["--config_name", "vit_tiny_patch16_224", "--config_overrides", "min_keep=4"])
    assert args.config_overrides == "min_keep=4" and args.image_size is None and args.recipe == "official"


def test_embedded_demo_defaults_fill_only_the_options_not_given(tmp_path):
    args = parse_args(["--max_train_steps", "7"])
    assert args.max_train_steps == 7 and args.output_dir == "outputs/pretrain-default"
    assert args.learning_rate == 5e-4 and args.per_device_train_batch_size == 16
    assert "max_train_steps" not in args.demo_defaults_applied and args.demo_defaults_applied["learning_rate"] == 5e-4
    assert args.overwrite_output_dir  # the demo's own folder: running the main job again replaces its last run
    assert not parse_args(["--output_dir", str(tmp_path / "mine")]).overwrite_output_dir
    assert not parse_args(["--resume_from_checkpoint", "latest"]).overwrite_output_dir
    config = build_config(args)
    assert config.encoder_config.image_size == 96 and config.encoder_config.patch_size == 8
    assert config.min_keep == 4
    # The demo's predictor is the small recipe's: one block as wide as the encoder, a quarter of the run warm-up.
    assert args.recipe == "small" and args.warmup_fraction == 0.25
    assert (config.predictor_config.hidden_size, config.predictor_config.num_hidden_layers) == (128, 1)
    # Its target encoder follows faster than the official 0.996 -> 1.0; an explicit --ema_momentum wins.
    assert tuple(config.ema_momentum) == (0.99, 0.999)
    assert tuple(build_config(parse_args(["--ema_momentum", "0.996,1.0"])).ema_momentum) == (0.996, 1.0)
    # Picking a model drops the demo's model (its recipe and EMA); --num_train_epochs drops its step budget.
    args = parse_args(["--config_name", "vit_tiny_patch16_224", "--num_train_epochs", "3"])
    assert args.config_overrides is None and args.image_size is None and args.recipe == "official"
    assert args.ema_momentum is None and tuple(build_config(args).ema_momentum) == (0.996, 1.0)
    assert args.max_train_steps is None and args.num_train_epochs == 3
    # With a data source nothing of the demo applies: the documented defaults hold.
    args = parse_args(["--train_dir", str(tmp_path), "--num_train_epochs", "300"])
    assert args.demo_defaults_applied == {} and args.max_train_steps is None and args.learning_rate == 1e-3
    assert args.per_device_train_batch_size == 64 and args.output_dir == "outputs/pretrain"
    # The command line and the same options from a JSON file are the same run.
    argv = ["--train_dir", str(tmp_path), "--num_train_epochs", "3", "--learning_rate", "2e-3"]
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"train_dir": str(tmp_path), "num_train_epochs": 3, "learning_rate": 2e-3}))
    assert parse_args(argv).to_dict() == parse_args([str(path)]).to_dict()
    path.write_text(json.dumps({"max_train_steps": 9}))
    assert parse_args([str(path)]).to_dict() == parse_args(["--max_train_steps", "9"]).to_dict()


def test_embedded_scenes_option_is_checked_and_reaches_the_data(tmp_path):
    args = parse_args(["--embedded_scenes", "shared_shape=false,radius_range=[0.14,0.3]"])
    assert args.embedded_scene_settings == {"shared_shape": False, "radius_range": (0.14, 0.3)}
    data = build_pretraining_data(image_size=32, embedded_num_images=3,
                                  embedded_scene_settings=args.embedded_scene_settings)
    assert "radius_range=(0.14, 0.3)" in repr(data.dataset.source) and "shared_shape=False" in repr(data.dataset.source)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['colour'\].*shared_shape"):
        parse_args(["--embedded_scenes", "colour=1"])
    with pytest.raises(ValueError, match="radius_range must satisfy"):
        parse_args(["--embedded_scenes", "radius_range=[0.3,0.6]"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        parse_args(["--embedded_scenes", "shared_shape"])
    with pytest.raises(ValueError, match="a data argument .* is given"):
        parse_args(["--train_dir", str(tmp_path), "--embedded_scenes", "max_objects=2"])


def test_example_main_job_writes_probe_table_and_figures(tmp_path, monkeypatch, capsys):
    """The main job's tail on a tiny run: probes of three feature sets for every label, the figures, the printout."""
    sys.path.insert(0, str(REPO_ROOT / "examples"))
    try:
        import pretrain as example  # examples/pretrain.py
    finally:
        sys.path.pop(0)
    monkeypatch.setattr(example, "PROBE_TRAIN_IMAGES", 40)
    monkeypatch.setattr(example, "PROBE_TEST_IMAGES", 20)
    # The probe draws its scenes with the pretraining's settings (here one object per scene: count is always 1).
    summary = example.main([*tiny_argv(tmp_path / "run", steps=2), "--embedded_scenes", "max_objects=1,noise_std=0"])
    results = summary["probe"]
    assert "objects=1..1" in results["data"]["generator"] and results["labels"]["count"]["classes"] == [1]
    assert results["main_label"] == example.MAIN_LABEL == "texture"
    assert list(results["labels"]) == list(example.PROBE_LABELS)
    assert [row["model"] for row in results["rows"]][:2] == ["I-JEPA target encoder", "random init (same architecture)"]
    # Probe features: the last PROBE_LAYERS blocks concatenated, clamped to this 2-block encoder (32 wide).
    assert example.PROBE_LAYERS == 4 and results["layers"] == 2
    assert [row["feature_dim"] for row in results["rows"][:2]] == [2 * 32, 2 * 32]
    for row in results["rows"]:
        for label in example.PROBE_LABELS:
            assert 0.0 <= row[label]["linear_accuracy"] <= 1.0 and 0.0 <= row[label]["knn_accuracy"] <= 1.0
            assert row[label]["knn"]["num_test"] == 20
    saved = json.loads((tmp_path / "run" / "probe_results.json").read_text())
    assert saved["probe"]["rows"][0]["texture"]["linear_accuracy"] == results["rows"][0]["texture"]["linear_accuracy"]
    for name in ("training_curves.png", "masks.png"):
        with Image.open(tmp_path / "run" / name) as image:
            assert image.width > 100 and image.height > 100
    printed = capsys.readouterr().out
    assert "texture (main) linear" in printed and "chance (majority class)" in printed
    assert "vs random init on texture" in printed and str(tmp_path / "run" / "probe_results.json") in printed


# ----------------------------------------------------------------------------------------------------------------
# Hub push (in-repo fake Hub)
# ----------------------------------------------------------------------------------------------------------------


def test_push_to_hub_uploads_model_encoder_and_cards_without_checkpoints(fake_hub, hf_home, tmp_path):
    from hub_utils import run_hub_script

    argv = tiny_argv(tmp_path / "pushed", "--checkpointing_steps", "1", "--push_to_hub",
                     "--hub_model_id", "fake-user/ijepa-tiny-pretrain", steps=2)
    proc = run_hub_script(f"""
        import json, os
        os.environ["OMP_NUM_THREADS"] = "1"
        from huggingface_hub import HfApi
        from ijepa_hf.training import parse_args, pretrain
        result = pretrain(parse_args({argv!r}))
        print("FILES", json.dumps(sorted(HfApi().list_repo_files("fake-user/ijepa-tiny-pretrain"))))
        print("URL", result.hub_url)
    """, fake_hub, hf_home, timeout=240)
    files = json.loads(proc.stdout.split("FILES", 1)[1].splitlines()[0])
    for name in ("README.md", "config.json", "model.safetensors", "preprocessor_config.json", "train_log.jsonl",
                 "encoder/README.md", "encoder/config.json", "encoder/model.safetensors"):
        assert name in files, (name, files)
    assert not [f for f in files if f.startswith("step_")], files


def test_continued_pretraining_keeps_the_licence_and_names_the_base_model(tmp_path):
    base = save_meta_derived_model(tmp_path / "meta-derived")
    out = tmp_path / "continued"
    pretrain(parse_args(["--model_name_or_path", str(base), "--output_dir", str(out), "--embedded_num_images", "8",
                         "--per_device_train_batch_size", "8", "--max_train_steps", "1"]))
    for folder in (out, out / "encoder"):
        card = (folder / "README.md").read_text()
        assert "license: cc-by-nc-4.0" in card and "apache-2.0" not in card.split("---")[1], folder
        assert "facebook/ijepa_vith14_1k" in card, folder
        assert json.loads((folder / "config.json").read_text())["weights_license"] == "cc-by-nc-4.0"


def test_an_encoder_repo_where_a_pretraining_repo_is_expected_is_a_short_clear_error(tmp_path):
    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    encoder_repo = tmp_path / "encoder"
    IJepaForPreTraining(config).export_encoder("target").save_pretrained(encoder_repo)
    for flag in ("--model_name_or_path", "--config_name"):
        with pytest.raises(ValueError, match="Expected a pretraining config .* single encoder") as error:
            build_config(parse_args([flag, str(encoder_repo), "--output_dir", str(tmp_path / "o")]))
        assert len(str(error.value)) < 1200 and "has no setter" not in str(error.value)


@pytest.mark.parametrize("disabled", [False, True])
def test_disable_tqdm_silences_the_progress_bar_and_keeps_the_log(tmp_path, capfd, disabled):
    """``--disable_tqdm`` (TrainingArguments' name) for logs read by programs: no bar on stderr, the same log rows."""
    run(tmp_path / "out", *(["--disable_tqdm"] if disabled else []), steps=2, images=16)
    assert ("pretraining:" in capfd.readouterr().err) is not disabled
    assert [row["step"] for row in read_log(tmp_path / "out")] == [2]


def test_a_seed_no_generator_takes_is_refused_naming_the_option(tmp_path, load_example, capsys):
    """`--seed -1` stopped every script with numpy's "Seed must be between 0 and 2**32 - 1", which does not say
    which option is wrong (pretrain.py only after building the model); each entry point now names --seed."""
    for seed in (-1, 2**32):
        with pytest.raises(ValueError, match=rf"--seed must be an integer in \[0, 2\*\*31 - 1\], got {seed}"):
            PretrainingArguments(seed=seed)
    with pytest.raises(ValueError, match=r"--seed must be an integer in \[0, 2\*\*31 - 1\], got -1"):
        load_example("pretrain_trainer").parse(["--seed", "-1", "--output_dir", str(tmp_path / "t")])
    with pytest.raises(SystemExit):
        load_example("finetune").parse_args(["--model_name_or_path", "m", "--dataset_name", "procedural_shapes",
                                             "--do_train", "--seed", "-1", "--output_dir", str(tmp_path / "f")])
    assert "--seed must be an integer in [0, 2**31 - 1], got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_example("probe").parse_args(["--model_name_or_path", "m", "--dataset_name", "procedural_shapes",
                                          "--seed", "-1"])
    assert "--seed must be an integer in [0, 2**31 - 1], got -1" in capsys.readouterr().err
    assert PretrainingArguments(seed=2**31 - 1).seed == 2**31 - 1


def test_masks_the_config_cannot_sample_are_refused_before_any_image_is_read(tmp_path, monkeypatch, load_example):
    """A grid too small for the masks (here 4x4 patches with min_keep=4) was refused only after the data was
    indexed: minutes of "Generating train split" for a large image folder, then a config error. Both pretraining
    scripts now build the mask sampler from the config before the data."""
    import ijepa_hf.training.loop as loop

    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the masks were checked")

    monkeypatch.setattr(loop, "build_pretraining_data", no_data)
    options = ["--train_dir", str(tmp_path), "--config_name", "vit_tiny_patch16_224", "--image_size", "64",
               "--config_overrides", "min_keep=4", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="Mask sampler cannot work with image_size=\\(64, 64\\)"):
        pretrain(parse_args([*options, "--max_train_steps", "1"]))
    example = load_example("pretrain_trainer")
    monkeypatch.setattr(example, "build_pretraining_data", no_data)
    with pytest.raises(ValueError, match="Mask sampler cannot work with image_size=\\(64, 64\\)"):
        example.main([*options, "--max_steps", "1", "--use_cpu", "--report_to", "none"])
    assert not (tmp_path / "out").exists()


def test_pretraining_takes_the_local_fashion_mnist_by_the_name_the_probes_take(tmp_path, monkeypatch, load_example):
    """`--dataset_name fashion_mnist` is the local (Debian) Fashion-MNIST for probe.py, finetune.py and
    extract_features.py, but pretrain.py and pretrain_trainer.py sent it to the Hub ("Couldn't reach
    'fashion_mnist'" offline): one vocabulary now, its 'test' split the held-out images of eval_loss.
    `procedural_shapes` names the embedded data, which a pretraining run takes without a data argument."""
    from tiny import write_fake_fashion_mnist

    monkeypatch.setenv("FASHION_MNIST_DIR", str(write_fake_fashion_mnist(tmp_path / "fmnist", train=64, test=32)))
    data = build_pretraining_data(image_size=32, dataset_name="fashion_mnist", max_train_samples=40)
    assert data.num_images == 40 and "fashion_mnist" in data.description
    assert data.fingerprint() == build_pretraining_data(image_size=32, dataset_name="fashion_mnist",
                                                        max_train_samples=40).fingerprint()  # resumable
    result = run(tmp_path / "run", "--dataset_name", "fashion_mnist", "--eval_steps", "2",
                 "--validation_split_name", "test", "--online_probe_steps", "2", steps=2)
    rows = read_log(tmp_path / "run")
    assert result.global_step == 2 and any("eval_loss" in row for row in rows)
    assert any("online_knn_accuracy" in row for row in rows)  # its labels feed the online probe
    trainer = load_example("pretrain_trainer").main(
        ["--dataset_name", "fashion_mnist", "--output_dir", str(tmp_path / "trainer"), "--max_steps", "1",
         "--use_cpu", "--report_to", "none", "--config_overrides", TINY_OVERRIDES, "--online_probe_steps", "0",
         "--per_device_train_batch_size", "8"])
    assert trainer.state.global_step == 1
    with pytest.raises(ValueError, match="procedural_shapes is the embedded data.*without --dataset_name"):
        build_pretraining_data(image_size=32, dataset_name="procedural_shapes")
    with pytest.raises(ValueError, match="fashion_mnist is read from local files.*--streaming"):
        build_pretraining_data(image_size=32, dataset_name="fashion_mnist", streaming=True)

"""IJepaTrainer honours TrainingArguments or refuses them naming the field; examples/pretrain_trainer.py applies
the same defaults with and without arguments."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from ijepa_hf.training import IJepaTrainer, official_training_arguments

from tiny import REPO_ROOT, tiny_trainer_parts, trainer_args



class _LrRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.wds: list[list[float]] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])
        self.wds.append([g["weight_decay"] for g in optimizer.param_groups])


@pytest.mark.parametrize("values, match", [
    ({"optim": "sgd"}, "optim='sgd' is not supported"),
    ({"optim": "adamw_torch", "optim_args": "foo=1"}, "optim_args"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be a positive integer, got 0"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be a positive integer, got 0"),
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size must be a positive integer, got 0"),
    ({"fp16": True}, "fp16 mixed precision is not applied on CPU"),
    ({"weight_decay": -1.0}, r"weight_decay must be a finite number >= 0, got -1.0"),
    # no labels and no token embeddings: label smoothing was ignored without a word, NEFTune an AttributeError
    ({"label_smoothing_factor": 0.1}, r"label_smoothing_factor=0.1 smooths classification labels"),
    ({"neftune_noise_alpha": 5.0}, r"neftune_noise_alpha=5.0 adds noise to a language model's token embeddings"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"start_lr": 2e-4}}, "warm-up would go down"),
    ({"lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {"min_lr": 1e-6}}, r"\['min_lr'\] are not options"),
])
def test_arguments_it_cannot_honour_are_refused_naming_the_field(tmp_path, values, match):
    model, collator, data = tiny_trainer_parts()
    with pytest.raises(ValueError, match=match):  # learning_rate is TrainingArguments' default 5e-5
        IJepaTrainer(model=model, args=trainer_args(tmp_path, **values), train_dataset=data, data_collator=collator)


def test_weight_decay_and_the_lr_schedule_type_are_honoured(tmp_path, caplog):
    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, learning_rate=1e-3, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=1,
                 optim="adamw_torch")
    with caplog.at_level("WARNING"):
        trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    assert "remove_unused_columns" not in caplog.text  # a torch dataset has no columns to remove
    recorder = _LrRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    assert all(wd == 0.0 for row in recorder.wds for wd in row)  # weight_decay=0 stays 0 (no ramp to 0.4)
    # transformers' own linear schedule: warm-up to the peak over 1 step, then linear decay to 0 at step 4.
    assert recorder.lrs == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    assert not trainer.optimizer.defaults.get("fused")  # adamw_torch: torch's default implementation


def test_the_official_recipe_arguments(tmp_path):
    model, collator, data = tiny_trainer_parts()
    args = official_training_arguments(str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=30,
                                       use_cpu=True, report_to="none", save_strategy="no")
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator, final_weight_decay=0.4)
    recorder = _LrRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    warmup = 4  # ceil(30 * 40 / 300)
    assert recorder.lrs[0] == pytest.approx(2e-4 + (1e-3 - 2e-4) / warmup)
    assert recorder.lrs[warmup - 1] == pytest.approx(1e-3) and recorder.lrs[-1] == pytest.approx(1e-6)
    decay = [row[0] for row in recorder.wds]
    assert decay[0] > 0.04 and decay[-1] == pytest.approx(0.4) and trainer.optimizer.defaults.get("fused")


def test_the_search_for_unused_parameters_is_off_unless_asked_for(tmp_path, monkeypatch):
    """Under data parallelism the Trainer's default for a model like this one searched the autograd graph for unused
    parameters after every forward; IJepaTrainer's default is no search (the two-process tests run it), an explicit
    setting is honoured, and the caller's arguments are left as given."""
    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path)
    trainer = IJepaTrainer(model, args, collator, data)  # positional, as the Trainer takes them
    assert trainer.args.ddp_find_unused_parameters is False and args.ddp_find_unused_parameters is None
    assert trainer.train_dataset is data and trainer.data_collator is collator
    asked = trainer_args(tmp_path, ddp_find_unused_parameters=True)
    assert IJepaTrainer(model=model, args=asked, train_dataset=data).args.ddp_find_unused_parameters is True
    monkeypatch.chdir(tmp_path)  # with no arguments the Trainer's default output_dir is relative
    assert IJepaTrainer(model=model).args.ddp_find_unused_parameters is False


def test_pretrain_trainer_example_has_the_same_defaults_with_and_without_arguments(tmp_path, load_example):
    example = load_example("pretrain_trainer")
    recipe = ("learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay", "optim",
              "max_grad_norm", "remove_unused_columns")
    _, bare = example.parse([])
    _, some = example.parse(["--max_steps", "7", "--output_dir", str(tmp_path)])
    _, data = example.parse(["--train_dir", str(tmp_path), "--num_train_epochs", "3"])
    for name in recipe:
        assert getattr(bare, name) == getattr(some, name), name
        if name != "warmup_steps":  # the embedded demo's 50-step budget has its own warm-up
            assert getattr(bare, name) == getattr(data, name), name
    assert data.warmup_steps == pytest.approx(40 / 300) and bare.warmup_steps == 0.1  # a tenth of any length
    assert bare.learning_rate == 1e-3 and bare.max_grad_norm == 0.0 and bare.remove_unused_columns is False
    assert some.max_steps == 7 and data.max_steps == -1 and data.num_train_epochs == 3  # no demo budget with data
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"max_steps": 7, "output_dir": str(tmp_path)}))
    (json_script, from_json), (cli_script, from_cli) = example.parse([str(path)]), example.parse(
        ["--max_steps", "7", "--output_dir", str(tmp_path)])
    assert json_script == cli_script and from_json.to_dict() == from_cli.to_dict()


def test_pretrain_trainer_example_defaults_are_official_training_arguments(tmp_path, load_example):
    """The example took a hand-picked list of official_training_arguments' fields as its defaults, and the input
    pipeline's were missing from it: without dataloader_drop_last the workers were not handed each sample's mask
    index (a resumed run's masks then differ with persistent workers) and the copies were blocking. Every field the
    official arguments set is now the example's default."""
    from transformers import TrainingArguments

    example = load_example("pretrain_trainer")
    official = official_training_arguments(str(tmp_path)).to_dict()
    plain = TrainingArguments(str(tmp_path)).to_dict()
    recipe = {name: value for name, value in official.items() if plain[name] != value}
    assert {"dataloader_drop_last", "accelerator_config", "learning_rate"} <= set(recipe)
    _, data = example.parse(["--train_dir", str(tmp_path), "--output_dir", str(tmp_path)])
    assert {name: data.to_dict()[name] for name in recipe} == recipe


def test_data_fewer_than_one_global_batch_is_refused_not_trained_for_zero_steps(tmp_path):
    """With dataloader_drop_last (the official loader's, and official_training_arguments'), images fewer than one
    global batch gave an empty loader: the Trainer "finished" after 0 updates and the untrained model was saved as
    the run's. As in pretrain(), it is refused, naming the fix."""
    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, per_device_train_batch_size=8, max_steps=3, dataloader_drop_last=True)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=torch.utils.data.Subset(data, range(4)),
                           data_collator=collator)
    with pytest.raises(ValueError, match=r"4 images are fewer than one global batch \(8 x 1 processes\).*"
                                         r"per_device_train_batch_size"):
        trainer.train()


def test_an_online_probe_setting_it_cannot_use_is_refused_before_training(tmp_path, load_example):
    """pretrain_trainer.py --online_probe_k 0 trained until the first probe (a tenth of the run by default, hours
    on a real one) and stopped there on the k-NN's own check; pretrain.py refuses it before training. So does the
    callback now, when it is made."""
    from ijepa_hf.training import OnlineProbeCallback

    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        OnlineProbeCallback(probe_set=None, every_n_steps=2, k=0)
    example = load_example("pretrain_trainer")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        example.main(["--output_dir", str(out), "--max_steps", "4", "--online_probe_steps", "2", "--online_probe_k",
                      "0", "--save_strategy", "steps", "--save_steps", "1", "--use_cpu", "--embedded_num_images",
                      "64", "--report_to", "none"])
    assert not list(out.glob("checkpoint-*"))  # nothing was trained


@pytest.mark.parametrize("option, value, message", [
    ("--online_probe_steps", "-1", "--online_probe_steps must be >= 0"),
    ("--collapse_threshold", "-1", "collapse_threshold must be a finite number >= 0"),
    ("--collapse_max_cosine", "2", r"collapse_max_cosine must be a number in \[-1, 1\]"),
    ("--embedded_num_images", "0", "--embedded_num_images must be a positive integer"),
    # these ran: 0 steps trained the Trainer's default 3 epochs, a batch of 0 stopped with a ZeroDivisionError
    # traceback once the data was read, a negative shuffle buffer did not shuffle without a word
    ("--max_steps", "0", "--max_steps 0 trains nothing"),
    ("--num_train_epochs", "0", "--num_train_epochs 0 trains nothing"),
    ("--per_device_train_batch_size", "0", "per_device_train_batch_size must be a positive integer, got 0"),
    ("--shuffle_buffer_size", "-5", r"--shuffle_buffer_size must be >= 0 \(0: no shuffling\), got -5"),
    ("--weight_decay", "-1", "weight_decay must be a finite number >= 0, got -1.0"),  # torch's raw message, late
    ("--label_smoothing_factor", "0.1", "label_smoothing_factor=0.1 smooths classification labels"),
    ("--use_liger_kernel", "true", "use_liger_kernel patches language models"),  # an ImportError traceback
])
def test_pretrain_trainer_refuses_its_own_options_out_of_range_when_parsing(tmp_path, load_example, option, value,
                                                                            message):
    """As pretrain.py, before any data is read: a collapse threshold no value can cross turned the warning off
    without a word, and -1 online-probe steps got the callback's error naming its keyword (every_n_steps)."""
    example = load_example("pretrain_trainer")
    with pytest.raises(ValueError, match=message):
        example.parse(["--output_dir", str(tmp_path / "run"), option, value])


def test_pretrain_trainer_takes_its_config_from_its_own_folder_when_overwriting(tmp_path, load_example):
    """`--config_name run --output_dir run --overwrite_output_dir` (a new run with an earlier run's model config): the
    config is read before the folder policy moves the earlier run's outputs aside."""
    example = load_example("pretrain_trainer")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "1", "--use_cpu", "--online_probe_steps", "0",
            "--embedded_num_images", "64", "--report_to", "none"]
    first = example.main(argv)
    trainer = example.main([*argv, "--config_name", str(out), "--overwrite_output_dir", "--seed", "1"])
    assert trainer.state.global_step == 1
    same = {key: value for key, value in first.model.config.to_dict().items() if key != "_name_or_path"}
    assert {key: value for key, value in trainer.model.config.to_dict().items() if key != "_name_or_path"} == same


def test_pretrain_trainer_example_config_overrides_change_the_demos_model(tmp_path, load_example):
    example = load_example("pretrain_trainer")
    from ijepa_hf.configuration_ijepa_hf import parse_config_overrides

    bare, _ = example.parse([])
    script, _ = example.parse(["--config_overrides", "predictor.num_hidden_layers=3"])
    overrides = parse_config_overrides(script.config_overrides)
    assert script.image_size == bare.image_size == 64 and overrides["predictor.num_hidden_layers"] == 3
    assert {k: v for k, v in overrides.items() if k != "predictor.num_hidden_layers"} == {
        k: v for k, v in parse_config_overrides(bare.config_overrides).items() if k != "predictor.num_hidden_layers"}
    assert script.user_overrides == {"predictor.num_hidden_layers"}
    script, _ = example.parse(["--config_name", "vit_tiny_patch16_224", "--config_overrides", "min_keep=4"])
    assert script.config_overrides == "min_keep=4" and script.image_size is None


def test_pretrain_trainer_example_with_one_seed_starts_from_the_same_weights(tmp_path, monkeypatch, load_example):
    example = load_example("pretrain_trainer")
    built = []
    original = example.IJepaForPreTraining

    def record(config):
        model = original(config)
        built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model

    monkeypatch.setattr(example, "IJepaForPreTraining", record)
    torch.manual_seed(1)  # whatever the global RNG holds before, --seed decides the initial weights
    example.main(["--output_dir", str(tmp_path / "a"), "--max_steps", "1", "--seed", "0", "--use_cpu",
                  "--online_probe_steps", "0", "--embedded_num_images", "64"])
    torch.manual_seed(2)
    example.main(["--output_dir", str(tmp_path / "b"), "--max_steps", "1", "--seed", "0", "--use_cpu",
                  "--online_probe_steps", "0", "--embedded_num_images", "64"])
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])


def test_a_negative_final_weight_decay_is_refused_whatever_the_lr_schedule(tmp_path):
    model, collator, data = tiny_trainer_parts()
    for scheduler in ("linear", "cosine"):
        with pytest.raises(ValueError, match="final_weight_decay must be a finite number >= 0"):
            IJepaTrainer(model=model, args=trainer_args(tmp_path, lr_scheduler_type=scheduler, learning_rate=1e-3),
                         train_dataset=data, data_collator=collator, final_weight_decay=-1.0)


def test_pretrain_trainer_example_publishes_what_pretrain_publishes_and_resumes_latest(tmp_path, fake_hub, hf_home):
    """The package's cards (licence, recipe), encoder/, the log and the curves, in the folder and on the Hub
    (without Trainer checkpoints or its pickled arguments); --resume_from_checkpoint latest continues."""
    from hub_utils import hub_env

    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "4", "--save_steps", "2", "--save_strategy", "steps",
            "--logging_steps", "1", "--use_cpu", "--online_probe_steps", "2", "--online_probe_images", "16",
            "--embedded_num_images", "64", "--report_to", "none"]
    env = {**hub_env(fake_hub, hf_home), "OMP_NUM_THREADS": "1"}
    script = REPO_ROOT / "examples" / "pretrain_trainer.py"
    proc = subprocess.run([sys.executable, str(script), *argv, "--push_to_hub", "--hub_model_id",
                           "someone/trainer-run"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    card = (out / "README.md").read_text()
    assert "license: apache-2.0" in card and "transformers.Trainer (IJepaTrainer)" in card
    assert "fine-tuned version of" not in card  # not transformers' generic card
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "encoder" / "README.md").is_file()
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
    assert any("online_knn_accuracy" in row for row in rows) and (out / "training_curves.png").is_file()
    listing = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import HfApi; print(HfApi().list_repo_files('someone/trainer-run'))"],
        env=env, capture_output=True, text=True, timeout=120)
    files = listing.stdout
    assert "encoder/model.safetensors" in files and "training_curves.png" in files and "README.md" in files
    assert "checkpoint-" not in files and "training_args.bin" not in files
    # the newest checkpoint-*: resuming a longer run starts at step 4 (the earlier checkpoints are not written again)
    written = {name: (out / name).stat().st_mtime_ns for name in ("checkpoint-2", "checkpoint-4")}
    longer = [*argv[:3], "6", *argv[4:]]
    proc = subprocess.run([sys.executable, str(script), *longer, "--resume_from_checkpoint", "latest"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert {name: (out / name).stat().st_mtime_ns for name in written} == written


def test_a_non_finite_loss_stops_the_trainer_and_nothing_non_finite_is_saved(tmp_path):
    """IJepaTrainer used to train on into NaN weights: Trainer's logging_nan_inf_filter hid the NaN losses (the log
    said 0.0) and the model was saved NaN. It now stops at the next log row, naming the step, as the Accelerate loop
    does, and writes no checkpoint with non-finite weights."""
    from safetensors.torch import load_file

    from ijepa_hf.training import NonFiniteLossError

    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, learning_rate=1e6, lr_scheduler_type="constant", max_steps=6, logging_steps=2,
                        save_strategy="steps", save_steps=1)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    with pytest.raises(NonFiniteLossError, match=r"non-finite \(NaN/inf\) at step 2 "):
        trainer.train()
    assert trainer.state.global_step == 2
    for checkpoint in (tmp_path / "trainer").glob("checkpoint-*"):
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint.name


def test_the_trainer_logs_the_collapse_signals_and_warns_as_the_loop_does(tmp_path, caplog):
    from ijepa_hf.training.metrics import COLLAPSE_KEYS

    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, logging_steps=2), train_dataset=data,
                           data_collator=collator, collapse_max_cosine=-1.0)  # any batch counts as collapsed
    with caplog.at_level("WARNING"):
        trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 4]
    for row in rows:
        assert set(COLLAPSE_KEYS) <= row.keys()
        assert row["target_std"] > 0 and -1.0 <= row["target_cosine"] < 1.0 and 1.0 <= row["target_rankme"] <= 4
        assert row["weight_decay"] == pytest.approx(trainer.args.weight_decay) and 0.996 <= row["momentum"] < 1.0
    assert "Possible representation collapse at step 2" in caplog.text


def test_pretrain_trainer_example_takes_the_collapse_thresholds(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "pretrain_trainer.py"), "--output_dir", str(tmp_path / "run"),
         "--max_steps", "2", "--logging_steps", "1", "--use_cpu", "--report_to", "none", "--online_probe_steps", "0",
         "--embedded_num_images", "64", "--collapse_max_cosine", "-1"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Possible representation collapse at step 1: target_cosine=" in proc.stderr


_TWO_PROCESS_RUN = '''
import json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from tiny import WithUnreadableRows, tiny_trainer_parts, trainer_args
from ijepa_hf.data import MaskedBatchCollator
from ijepa_hf.training import IJepaTrainer

model, collator, data = tiny_trainer_parts()
model.config.vicreg_variance_weight, model.config.regularized_embeddings = 1.0, "context_tokens"
args = trainer_args(Path(sys.argv[1]), per_device_train_batch_size=2, max_steps={max_steps}, logging_steps=1,
                    train_sampling_strategy="sequential")
# Batches of 2 go to the processes in turn: rows 2 and 3 are the second process's batch of the first update.
trainer = IJepaTrainer(model=model, args=args, train_dataset=WithUnreadableRows(data, {unreadable}),
                       data_collator=MaskedBatchCollator(collator))
trainer.train()
if trainer.is_world_process_zero():
    Path(sys.argv[1], "rows.json").write_text(json.dumps([r for r in trainer.state.log_history if "loss" in r]))
# An orderly exit (the examples get it from ijepa_hf.scripts.run_script), then none of the interpreter's teardown:
# a two-process Trainer run on CPU (gloo) sometimes aborts there after its work is done, even a plain transformers
# Trainer's (1 of 14 runs), which would make this test flaky for a reason outside it.
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush(), sys.stderr.flush()
os._exit(0)
'''


def _run_two_processes(tmp_path, unreadable, max_steps):
    """The two-process IJepaTrainer run of _TWO_PROCESS_RUN; returns the process and the main process's loss rows."""
    from tiny import free_port

    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "run.py"
    script.write_text(_TWO_PROCESS_RUN.format(tests=str(REPO_ROOT / "tests"), unreadable=list(unreadable),
                                              max_steps=max_steps))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port()), str(script), str(tmp_path / "out")]
    launched = subprocess.Popen(command, env={**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launched.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)  # the launcher and both processes
        stdout, stderr = launched.communicate()
        pytest.fail(f"the two-process run hung; its last output: {stderr[-3000:]}")
    proc = subprocess.CompletedProcess(command, launched.returncode, stdout, stderr)
    rows = tmp_path / "out" / "rows.json"
    return proc, json.loads(rows.read_text()) if rows.is_file() else None


def test_two_processes_log_on_past_a_batch_without_a_readable_image_on_one_of_them(tmp_path):
    """Under data parallelism a log row's collapse signals and regulariser terms are averaged over the processes.
    When one process's batch of a log step had no readable image, that process used to skip the collective the
    others entered, and the run hung; now every process takes part, and the row averages the batches that had
    images."""
    from ijepa_hf.training.metrics import COLLAPSE_KEYS

    proc, rows = _run_two_processes(tmp_path, unreadable=[2, 3], max_steps=3)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [row["step"] for row in rows] == [1, 2, 3]
    # Every trainable parameter takes part in each step's loss (a batch of no image too, as a zero-weight stand-in),
    # so the gradient all-reduce needs no search for unused ones: DDP's extra traversal of the autograd graph every
    # step, and the warning it prints on every process, were the Trainer's default for a PreTrainedModel.
    assert "find_unused_parameters=True" not in proc.stderr, proc.stderr[-3000:]
    for row in rows:
        assert set(COLLAPSE_KEYS) <= row.keys() and row["target_std"] > 0, row
        assert row["prediction_loss"] > 0 and row["variance_loss"] >= 0, row


def test_two_processes_train_on_when_one_of_them_reads_no_image_in_a_whole_epoch(tmp_path):
    """One process whose share of the data is unreadable for a whole epoch (a node whose staged copy of the data is
    broken) used to stop alone, leaving the other waiting in the next gradient all-reduce. As in the Accelerate
    loop, the run stops only when no process has read an image: here the other process's images train on, and
    the process without any makes zero-weight updates beside it."""
    # 16 rows in batches of 2, in turn: the second process reads rows 2-3, 6-7, 10-11 and 14-15, 4 batches an epoch
    proc, rows = _run_two_processes(tmp_path, unreadable=[2, 3, 6, 7, 10, 11, 14, 15], max_steps=6)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6] and all(row["loss"] > 0 for row in rows), rows
    # With no image readable in either process, both stop at the same update, naming the data (none is left waiting)
    proc, rows = _run_two_processes(tmp_path / "none", unreadable=range(16), max_steps=6)
    assert proc.returncode != 0 and rows is None
    assert proc.stderr.count("no readable image in a whole epoch (4 batches in each process)") >= 2, proc.stderr[-3000:]


def test_every_log_row_has_the_collapse_signals_whatever_asked_for_it(tmp_path):
    """The rows that the online probe adds between logging_steps, and the rows of logging_strategy="epoch", carry
    the collapse signals too (they were computed on the updates the Trainer's logging_steps rule named only)."""
    from ijepa_hf.data import build_online_probe_set, build_pretraining_data
    from ijepa_hf.training import OnlineProbeCallback
    from ijepa_hf.training.metrics import COLLAPSE_KEYS

    model, collator, data = tiny_trainer_parts()
    probe_set = build_online_probe_set(build_pretraining_data(image_size=32, embedded_num_images=16), image_size=32,
                                       num_images=8)
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path / "a", logging_steps=3), train_dataset=data,
                           data_collator=collator, callbacks=[OnlineProbeCallback(probe_set, every_n_steps=2)])
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [2, 3, 4]  # the probe's (2, 4) and logging_steps' (3)
    assert all(set(COLLAPSE_KEYS) <= row.keys() for row in rows), rows

    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path / "b", logging_strategy="epoch", max_steps=8),
                           train_dataset=data, data_collator=collator)
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in rows] == [4, 8]
    assert all(set(COLLAPSE_KEYS) <= row.keys() for row in rows), rows


def test_a_trainer_checkpoint_cut_short_is_skipped_by_latest_and_refused_by_name(tmp_path, caplog):
    """Trainer writes a checkpoint's files one after the other, trainer_state.json last, so a kill during a save
    (a node lost, the OOM killer) leaves a folder without it, or with half of it. ``latest`` and
    ``resume_from_checkpoint=True`` used to pick that folder and stop on the missing file at every restart; they now
    skip it, naming it, and resume the newest complete checkpoint. Named by its path, it is refused, naming the
    newest complete one."""
    from ijepa_hf.scripts import resolve_resume_checkpoint
    from ijepa_hf.training.checkpointing import CheckpointError

    out = tmp_path / "trainer"
    model, collator, data = tiny_trainer_parts()
    IJepaTrainer(model=model, args=trainer_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=data,
                 data_collator=collator).train()
    complete = out / "checkpoint-4"
    assert (complete / "trainer_state.json").is_file()
    torn = out / "checkpoint-6"  # killed while writing the weights: no optimizer, no trainer state
    torn.mkdir()
    (torn / "model.safetensors").write_bytes((complete / "model.safetensors").read_bytes()[:1000])
    half = out / "checkpoint-8"  # killed while writing trainer_state.json
    shutil.copytree(complete, half)
    text = (complete / "trainer_state.json").read_text()
    (half / "trainer_state.json").write_text(text[: len(text) // 2])

    with caplog.at_level("WARNING"):
        assert resolve_resume_checkpoint("latest", out) == str(complete)
    assert str(torn) in caplog.text and str(half) in caplog.text and "cut short" in caplog.text
    with pytest.raises(CheckpointError, match=f"{torn}.*cut short.*{complete}"):
        resolve_resume_checkpoint(str(torn), out)

    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=6),
                           train_dataset=data, data_collator=collator)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 6
    assert [row["step"] for row in trainer.state.log_history if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert (out / "checkpoint-6" / "trainer_state.json").is_file()  # the torn folder was written anew
    with pytest.raises(CheckpointError, match="checkpoint-8.*cut short"):
        trainer.train(resume_from_checkpoint=str(half))


def _trainer_checkpoint(folder, step, complete=True):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights of step %d" % step)
    (path / "optimizer.pt").write_bytes(b"its optimizer state")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_the_trainer_scripts_output_folder_policy(tmp_path, caplog):
    """As pretrain()'s: a new run into a folder holding another run is refused, naming the options; an overwriting
    run moves the other run's checkpoints aside (else `latest` would resume them, and Trainer's rotation would
    prune the new run's first); resuming checkpoint-N moves the later ones (an abandoned branch, or folders cut
    short) aside. Nothing is deleted."""
    from ijepa_hf.training.checkpointing import prepare_trainer_output_dir

    assert prepare_trainer_output_dir(tmp_path / "new", resume_from_checkpoint=None, overwrite_output_dir=False) is None
    out = tmp_path / "out"
    (tmp_path / "finished").mkdir()
    (tmp_path / "finished" / "model.safetensors").write_bytes(b"a finished run's weights")
    old = [_trainer_checkpoint(out, step) for step in (2, 4, 6)]
    (out / "README.md").write_text("the other run's card")
    with pytest.raises(ValueError, match="already holds another run.*checkpoint-2.*--resume_from_checkpoint latest.*"
                                         "--overwrite_output_dir"):
        prepare_trainer_output_dir(out, resume_from_checkpoint=None, overwrite_output_dir=False)
    assert all(path.is_dir() for path in old)
    with pytest.raises(ValueError, match="latest: .* has no complete checkpoint to continue from, but holds another"):
        prepare_trainer_output_dir(tmp_path / "finished", resume_from_checkpoint="latest", overwrite_output_dir=False)
    with pytest.raises(ValueError, match="only one of them"):
        prepare_trainer_output_dir(out, resume_from_checkpoint=str(old[0]), overwrite_output_dir=True)

    with caplog.at_level("WARNING"):
        prepare_trainer_output_dir(out, resume_from_checkpoint=str(old[0]), overwrite_output_dir=False)
    abandoned = next(out.glob("_abandoned-*"))
    assert sorted(p.name for p in abandoned.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert old[0].is_dir() and "checkpoint-4, checkpoint-6" in caplog.text

    with caplog.at_level("WARNING"):
        prepare_trainer_output_dir(out, resume_from_checkpoint=None, overwrite_output_dir=True)
    replaced = next(out.glob("_replaced-*"))  # its checkpoints and outputs: the new run mixes into none of them
    assert sorted(p.name for p in replaced.iterdir()) == ["README.md", "checkpoint-2"]
    assert (replaced / "README.md").read_text() == "the other run's card" and not (out / "README.md").exists()
    assert not list(out.glob("checkpoint-*")) and str(replaced) in caplog.text


def test_a_push_leaves_out_the_checkpoints_the_folder_policy_set_aside(tmp_path, fake_hub, hf_home):
    """`--overwrite_output_dir` and resuming an earlier checkpoint move checkpoints aside inside the folder; the push
    of a finished run (`pretrain_trainer.py --push_to_hub`, `ijepa-hf push`) left out `checkpoint-*` but uploaded
    the ones set aside: another run's weights, optimizer state and pickled arguments."""
    from hub_utils import hub_env

    from ijepa_hf.training.checkpointing import prepare_trainer_output_dir

    out = tmp_path / "run"
    for step in (2, 4):
        _trainer_checkpoint(out, step)
    prepare_trainer_output_dir(out, resume_from_checkpoint=str(out / "checkpoint-2"), overwrite_output_dir=False)
    prepare_trainer_output_dir(out, resume_from_checkpoint=None, overwrite_output_dir=True)
    (out / "encoder").mkdir()
    for folder in (out, out / "encoder"):  # what a finished run leaves
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"the new run's weights")
    env = hub_env(fake_hub, hf_home)
    proc = subprocess.run([sys.executable, "-m", "ijepa_hf.cli", "push", str(out), "someone/run"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import HfApi; print(HfApi().list_repo_files('someone/run'))"],
        env=env, capture_output=True, text=True, timeout=120)
    assert "encoder/model.safetensors" in listing.stdout and "checkpoint-" not in listing.stdout, listing.stdout


def test_resuming_a_checkpoint_of_another_folder_into_a_folder_holding_a_run_is_refused(tmp_path):
    """As pretrain(): resuming another folder's checkpoint into a folder that holds another run (a wrong
    --output_dir) would write the resumed run's checkpoints among that run's, overwriting those whose steps meet; it
    is refused, naming the checkpoint's own folder. Into a new folder it continues; a checkpoint set aside in the
    folder itself (an abandoned branch taken up again) moves the folder's later checkpoints aside, as any resume."""
    from ijepa_hf.training.checkpointing import prepare_trainer_output_dir

    source, other = tmp_path / "source", tmp_path / "other"
    for step in (2, 4):
        _trainer_checkpoint(source, step)
    _trainer_checkpoint(other, 2)
    with pytest.raises(ValueError, match="holds another run .*checkpoint-2.* resume into the checkpoint's own folder"):
        prepare_trainer_output_dir(other, resume_from_checkpoint=str(source / "checkpoint-4"),
                                   overwrite_output_dir=False)
    assert prepare_trainer_output_dir(tmp_path / "new", resume_from_checkpoint=str(source / "checkpoint-4"),
                                      overwrite_output_dir=False) == str(source / "checkpoint-4")
    out = tmp_path / "out"
    for step in (2, 4, 6, 8):
        _trainer_checkpoint(out, step)
    prepare_trainer_output_dir(out, resume_from_checkpoint=str(out / "checkpoint-2"), overwrite_output_dir=False)
    abandoned = next(out.glob("_abandoned-*"))
    for step in (4, 6):
        _trainer_checkpoint(out, step)  # the new branch
    prepare_trainer_output_dir(out, resume_from_checkpoint=str(abandoned / "checkpoint-6"), overwrite_output_dir=False)
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_pretrain_trainer_refuses_a_folder_holding_another_run(tmp_path, load_example):
    """It used to train into it: the other run's checkpoints were overwritten where their steps met, its later ones
    kept, and `latest` then resumed them."""
    from tiny import TINY_OVERRIDES

    example = load_example("pretrain_trainer")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--config_overrides", TINY_OVERRIDES, "--embedded_num_images", "32",
            "--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "2",
            "--online_probe_steps", "0", "--use_cpu", "--report_to", "none"]
    example.main([*argv, "--max_steps", "4"])
    weights = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds another run.*--overwrite_output_dir"):
        example.main([*argv, "--max_steps", "2", "--seed", "1"])
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == weights
    example.main([*argv, "--max_steps", "2", "--seed", "1", "--overwrite_output_dir"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (next(out.glob("_replaced-*")) / "checkpoint-4" / "model.safetensors").read_bytes() == weights


def test_pretrain_trainer_refuses_a_folder_another_run_is_training_into(tmp_path):
    """As pretrain.py: a second run into the folder of a live one (a requeued job while the first still runs, two
    jobs given one folder) fails at once, naming the holder, instead of both writing checkpoints there."""
    from ijepa_hf.training.checkpointing import OutputDirLock

    out = tmp_path / "run"
    with OutputDirLock(out):  # the live run
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "examples" / "pretrain_trainer.py"), "--output_dir", str(out),
             "--max_steps", "2", "--use_cpu", "--report_to", "none", "--online_probe_steps", "0",
             "--embedded_num_images", "64", "--resume_from_checkpoint", "latest"],
            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is in use by another run" in proc.stderr and f"pid\": {os.getpid()}" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["_ijepa_hf.lock"]


def test_resuming_the_trainer_under_changed_settings_is_refused_naming_them(tmp_path):
    """As pretrain(): the checkpoint's model config and the settings that define the run must be the ones it was
    trained with. Trainer used to load the checkpoint's learning rate into the scheduler over a new one without a
    word, and any mask setting of the config with it; the operational ones (logging, saving) may change."""
    model, collator, data = tiny_trainer_parts()
    IJepaTrainer(model=model, args=trainer_args(tmp_path, save_strategy="steps", save_steps=2), train_dataset=data,
                 data_collator=collator).train()
    checkpoint = str(tmp_path / "trainer" / "checkpoint-2")

    model, collator, data = tiny_trainer_parts()
    model.config.num_target_blocks = 3
    args = trainer_args(tmp_path, save_strategy="steps", save_steps=2, learning_rate=1e-2,
                        per_device_train_batch_size=2)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    with pytest.raises(ValueError, match=r"Cannot resume exactly: the global batch is 2, the checkpoint's 4; "
                                         r"learning_rate is 0.01, the checkpoint was trained with 5e-05; config "
                                         r"num_target_blocks is 3, the checkpoint's is 2\."):
        trainer.train(resume_from_checkpoint=checkpoint)

    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, save_strategy="steps", save_steps=3, logging_steps=2)  # operational: allowed
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 4


def test_resuming_a_checkpoint_of_weights_only_is_refused(tmp_path):
    """A checkpoint saved with save_only_model holds no optimizer, scheduler or RNG state: Trainer resumed from it
    with fresh ones, without a word, so the learning-rate warm-up started again in the middle of the run."""
    from ijepa_hf.scripts import resolve_resume_checkpoint
    from ijepa_hf.training.checkpointing import CheckpointError

    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, save_strategy="steps", save_steps=2, save_only_model=True)
    IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator).train()
    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    with pytest.raises(CheckpointError, match="checkpoint-4: it holds the weights only .*save_only_model.*warm-up"):
        trainer.train(resume_from_checkpoint=True)
    # the Trainer scripts' --resume_from_checkpoint (finetune.py's too)
    with pytest.raises(CheckpointError, match="checkpoint-2: it holds the weights only"):
        resolve_resume_checkpoint(str(tmp_path / "trainer" / "checkpoint-2"), tmp_path / "trainer")


@pytest.mark.parametrize("scheduler", ["cosine", "linear"])
def test_a_warmup_longer_than_the_run_is_refused(tmp_path, scheduler):
    """As pretrain(): the learning rate would never reach its peak. IJepaTrainer's cosine used to cut the warm-up to
    the run's length without a word (the peak reached at the last step)."""
    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, warmup_steps=10, lr_scheduler_type=scheduler)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    with pytest.raises(ValueError, match=r"warmup_steps 10 is longer than the run \(4 steps\)"):
        trainer.train()
    assert trainer.state.global_step == 0


def test_pretrain_trainer_refuses_to_resume_on_other_images(tmp_path, load_example):
    """As pretrain.py: the checkpoint records what identifies its images (their paths relative to the folder and
    their sizes), so a resume on a folder that changed is refused, naming it; the same images elsewhere resume."""
    from PIL import Image
    from tiny import TINY_OVERRIDES

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 90, 30)).save(images / f"{i}.png")
    out = tmp_path / "run"
    example = load_example("pretrain_trainer")

    def run(folder, steps):
        return example.main(
            ["--train_dir", str(folder), "--output_dir", str(out), "--config_overrides", TINY_OVERRIDES,
             "--per_device_train_batch_size", "4", "--max_steps", str(steps), "--save_strategy", "steps",
             "--save_steps", "2", "--online_probe_steps", "0", "--use_cpu", "--report_to", "none",
             "--resume_from_checkpoint", "latest"])

    assert run(images, 2).state.global_step == 2
    staged = tmp_path / "staged"
    shutil.copytree(images, staged)
    Image.new("RGB", (40, 40)).save(images / "added.png")
    with pytest.raises(ValueError, match="Cannot resume exactly: data is") as refused:
        run(images, 4)
    assert "'files': 9" in str(refused.value) and "'files': 8" in str(refused.value)
    assert run(staged, 4).state.global_step == 4  # the checkpoint's images at another path


def test_pretrain_trainer_takes_the_crop_and_refuses_to_resume_under_another(tmp_path, load_example):
    """`--crop_scale` as pretrain.py's: the random crop's area range of the training images (and of the held-out
    images of eval_loss, read with the training crop). The crop shapes what the run learns, so a checkpoint records
    it and a resume under another one is refused, naming it, as pretrain.py refuses one."""
    example = load_example("pretrain_trainer")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--use_cpu", "--online_probe_steps", "0", "--embedded_num_images", "64", "--report_to", "none"]
    trainer = example.main([*argv, "--crop_scale", "0.8,1.0", "--do_eval"])
    assert trainer.train_dataset.crop_scale == (0.8, 1.0) == trainer.eval_dataset.crop_scale
    with pytest.raises(ValueError, match=r"crop_scale is \[0\.3, 1\.0\], the checkpoint was trained with "
                                         r"\[0\.8, 1\.0\]"):
        example.main([*argv, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-1")])
    with pytest.raises(ValueError, match="crop_scale"):
        example.main([*argv, "--crop_scale", "0.8", "--output_dir", str(tmp_path / "bad")])
    trainer = example.main([*argv, "--max_steps", "3", "--crop_scale", "0.8,1.0", "--resume_from_checkpoint",
                            str(out / "checkpoint-2")])
    assert trainer.state.global_step == 3


def test_pretrain_trainer_continues_a_saved_model(tmp_path, load_example):
    """`--model_name_or_path` as pretrain.py's: continue pretraining a saved model (an earlier run, or official
    weights converted with `ijepa-hf convert`) on other data, its config with it; the cards name the weights'
    source and keep their licence. With every rate at 0 one update leaves the loaded weights as they were."""
    from safetensors.torch import load_file

    from tiny import save_meta_derived_model

    example = load_example("pretrain_trainer")
    base = save_meta_derived_model(tmp_path / "meta-derived")
    out = tmp_path / "continued"
    zero = ["--learning_rate", "0", "--lr_scheduler_kwargs", '{"start_lr": 0, "final_lr": 0}', "--weight_decay", "0",
            "--final_weight_decay", "0", "--ema_momentum", "1,1"]
    trainer = example.main(["--model_name_or_path", str(base), "--output_dir", str(out), "--max_steps", "1",
                            "--use_cpu", "--online_probe_steps", "0", "--embedded_num_images", "64",
                            "--report_to", "none", *zero])
    assert trainer.state.global_step == 1 and trainer.model.config.encoder_config.hidden_size == 32
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for folder in (out, out / "encoder"):
        card = (folder / "README.md").read_text()
        assert "license: cc-by-nc-4.0" in card and "facebook/ijepa_vith14_1k" in card, folder
    with pytest.raises(ValueError, match="--recipe small sizes a new model's predictor"):
        example.main(["--model_name_or_path", str(base), "--recipe", "small", "--output_dir", str(tmp_path / "x")])


def test_pretrain_trainer_takes_the_embedded_scenes_and_refuses_to_resume_under_others(tmp_path, load_example):
    """`--embedded_scenes` as pretrain.py's: the embedded scenes' generator settings, for the training images and the
    held-out ones; they define what the run learns, so a resume under other scenes is refused, as pretrain.py
    refuses one, and a data argument beside them is refused."""
    example = load_example("pretrain_trainer")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
            "--use_cpu", "--online_probe_steps", "0", "--embedded_num_images", "64", "--report_to", "none"]
    trainer = example.main([*argv, "--embedded_scenes", "max_objects=1,shared_shape=false", "--do_eval"])
    for images in (trainer.train_dataset.source, trainer.eval_dataset.source):
        assert (images.max_objects, images.shared_shape) == (1, False)
    with pytest.raises(ValueError, match="max_objects=1"):  # the checkpoint's scenes, named
        example.main([*argv, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-1")])
    trainer = example.main([*argv, "--max_steps", "3", "--embedded_scenes", "max_objects=1,shared_shape=false",
                            "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert trainer.state.global_step == 3
    with pytest.raises(ValueError, match="--embedded_scenes.*unknown setting"):
        example.parse(["--embedded_scenes", "objects=2"])
    with pytest.raises(ValueError, match="--embedded_scenes sets the embedded scenes, but a data argument"):
        example.parse(["--embedded_scenes", "max_objects=1", "--train_dir", str(tmp_path)])


class _PoisonedCollator:
    """``collator`` whose calls in ``poisoned`` (1-based: the update they feed, one batch per update) carry a NaN
    pixel, as a corrupt image or an overflow would give."""

    def __init__(self, collator, poisoned):
        self.collator, self.poisoned, self.calls = collator, set(poisoned), 0

    def __call__(self, examples):
        batch = self.collator(examples)
        self.calls += 1
        if self.calls in self.poisoned:
            batch["pixel_values"] = batch["pixel_values"].clone()
            batch["pixel_values"][0, 0, 0, 0] = float("nan")
        return batch


def test_the_trainer_skips_as_many_non_finite_updates_as_asked(tmp_path):
    """`skip_nonfinite_steps` as pretrain()'s --skip_nonfinite_steps: an update whose loss is NaN changes nothing
    (no optimizer step, no EMA), the run goes on, and one more such update than allowed stops it, naming the
    option. IJepaTrainer had no such option: the first NaN stopped a run of days."""
    from transformers import TrainerCallback

    from ijepa_hf.training import NonFiniteLossError

    class Weights(TrainerCallback):
        def __init__(self):
            self.after = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.after[state.global_step] = {k: v.clone() for k, v in model.state_dict().items()}

    model, collator, data = tiny_trainer_parts()
    weights = Weights()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, max_steps=4, logging_steps=1), train_dataset=data,
                           data_collator=_PoisonedCollator(collator, {2}), skip_nonfinite_steps=1,
                           callbacks=[weights])
    trainer.train()
    assert trainer.skipped_updates == 1 and trainer.state.global_step == 4
    for name, value in weights.after[2].items():  # update 2 changed no weight, not even the target encoder's
        assert torch.equal(value, weights.after[1][name]), name
    assert any(not torch.equal(value, weights.after[2][name]) for name, value in weights.after[3].items())
    assert all(torch.isfinite(v).all() for v in weights.after[4].values())
    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, max_steps=4), train_dataset=data,
                           data_collator=_PoisonedCollator(collator, {1, 3}), skip_nonfinite_steps=1)
    with pytest.raises(NonFiniteLossError,
                       match=r"at step 3 .*one non-finite step more than skip_nonfinite_steps=1 allows"):
        trainer.train()
    with pytest.raises(ValueError, match="skip_nonfinite_steps must be an integer >= 0, got -1"):
        IJepaTrainer(model=model, args=trainer_args(tmp_path), train_dataset=data, data_collator=collator,
                     skip_nonfinite_steps=-1)


def test_pretrain_trainer_takes_skip_nonfinite_steps(tmp_path, load_example):
    example = load_example("pretrain_trainer")
    trainer = example.main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--use_cpu", "--report_to",
                            "none", "--online_probe_steps", "0", "--embedded_num_images", "64",
                            "--skip_nonfinite_steps", "3"])
    assert trainer.skip_nonfinite_steps == 3 and trainer.skipped_updates == 0
    with pytest.raises(ValueError, match="--skip_nonfinite_steps must be >= 0, got -1"):
        example.parse(["--skip_nonfinite_steps", "-1"])


def test_pretrain_trainer_streams_and_resumes_a_stream_exactly(tmp_path, load_example):
    """`--streaming` as pretrain.py's (nothing read up front; a Hub dataset of any size): pretrain_trainer.py had no
    such option. A run resumed from a checkpoint, across an epoch of the stream, ends with the weights of the run
    that was not stopped; a stream needs a step budget."""
    from PIL import Image

    from tiny import TINY_OVERRIDES

    for label in ("a", "b"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 40), (30 * i, 90 if label == "a" else 200, 30)).save(
                tmp_path / "images" / label / f"{i}.png")
    example = load_example("pretrain_trainer")
    argv = ["--train_dir", str(tmp_path / "images"), "--streaming", "--shuffle_buffer_size", "8", "--config_overrides",
            TINY_OVERRIDES, "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "2",
            "--online_probe_steps", "0", "--use_cpu", "--report_to", "none", "--max_steps", "7"]
    straight = example.main([*argv, "--output_dir", str(tmp_path / "straight")])
    assert isinstance(straight.train_dataset, torch.utils.data.IterableDataset)  # read as it goes, not indexed
    example.main([*argv, "--output_dir", str(tmp_path / "resumed")])
    for later in ("checkpoint-4", "checkpoint-6"):
        shutil.rmtree(tmp_path / "resumed" / later)
    resumed = example.main([*argv, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                            str(tmp_path / "resumed" / "checkpoint-2")])
    assert resumed.state.global_step == 7
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        example.parse(["--train_dir", str(tmp_path / "images"), "--streaming"])
    with pytest.raises(ValueError, match="--streaming needs --dataset_name or --train_dir"):
        example.parse(["--streaming"])


def _card_rows(folder) -> dict[str, str]:
    """The rows of a model card's training table: label -> value."""
    rows = {}
    for line in (folder / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0]] = cells[1]
    return rows


def test_the_trainers_card_records_the_recipe_as_pretrains_card_does(tmp_path):
    """IJepaTrainer's card wrote its learning-rate schedule as "SchedulerType.COSINE, peak 0.001, warm-up 0.25" (a
    fraction without its unit, no start or end), its weight decay as the constant 0.04 while the run ramped it to
    0.4, and no EMA, optimiser, clipping or crop. The same recipe now reads the same in both paths' cards."""
    from tiny import run

    from ijepa_hf.data import MaskedBatchCollator, build_pretraining_data

    model, collator, _ = tiny_trainer_parts()  # TINY_OVERRIDES: EMA 0.996 -> 1.0
    data = build_pretraining_data(image_size=32, embedded_num_images=16, uint8_images=True).dataset  # crop 0.3-1
    collator = MaskedBatchCollator(collator)
    args = official_training_arguments(str(tmp_path / "trainer"), max_steps=8, warmup_steps=2,
                                       per_device_train_batch_size=4, use_cpu=True, report_to="none",
                                       save_strategy="no", logging_steps=4, optim="adamw_torch")
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                           final_weight_decay=0.4)
    trainer.train()
    trainer.save_run(data_description="procedural shapes")
    loop = tmp_path / "loop"
    run(loop, "--learning_rate", "1e-3", "--start_lr", "2e-4", "--final_lr", "1e-6", "--weight_decay", "0.04",
        "--final_weight_decay", "0.4", "--online_probe_steps", "0")
    trainer_rows, loop_rows = _card_rows(tmp_path / "trainer"), _card_rows(loop)
    expected = {"Learning-rate schedule": "linear warm-up 0.0002 -> 0.001 over 2 steps, cosine to 1e-06",
                "Weight-decay schedule": "cosine 0.04 -> 0.4", "Target-encoder EMA momentum": "linear 0.996 -> 1",
                "Gradient clipping": "none", "Optimiser": "AdamW (betas 0.9, 0.999), official parameter groups"}
    for label, value in expected.items():
        assert loop_rows.get(label) == value, (label, loop_rows.get(label))
        assert trainer_rows.get(label) == value, (label, trainer_rows.get(label))
    assert trainer_rows["Augmentations"] == loop_rows["Augmentations"]


def test_the_trainers_card_states_the_final_loss_of_a_run_that_logged_no_loss_row(tmp_path):
    """A run shorter than logging_steps logs no loss row, and IJepaTrainer's card said "Final loss: n/a" though the
    Trainer's closing row holds the run's mean training loss; the card states that mean, and says it is one."""
    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, max_steps=3, logging_steps=100),
                           train_dataset=data, data_collator=collator)
    trainer.train()
    trainer.save_run(data_description="embedded")
    [summary] = [row for row in trainer.state.log_history if "train_loss" in row]
    assert not [row for row in trainer.state.log_history if "loss" in row]
    assert _card_rows(tmp_path / "trainer")["Final loss"] == (
        f"{summary['train_loss']:.5f} (the run's mean: no step logged a loss)")


def test_another_lr_scheduler_than_the_cosine_drops_or_refuses_the_cosines_options(tmp_path, load_example):
    """`pretrain_trainer.py --lr_scheduler_type linear` (and `official_training_arguments(lr_scheduler_type=
    "linear")`) kept the I-JEPA cosine's start_lr / final_lr in lr_scheduler_kwargs, and the run stopped in
    transformers with "get_linear_schedule_with_warmup() got an unexpected keyword argument 'start_lr'". The
    recipe's own cosine options now go with the cosine; given by the user for another scheduler, they are refused
    when the trainer is made, naming them."""
    assert official_training_arguments(str(tmp_path), lr_scheduler_type="linear").lr_scheduler_kwargs == {}
    assert official_training_arguments(str(tmp_path)).lr_scheduler_kwargs == {"start_lr": 2e-4, "final_lr": 1e-6}
    example = load_example("pretrain_trainer")
    _, args = example.parse(["--lr_scheduler_type", "linear", "--output_dir", str(tmp_path / "a")])
    assert args.lr_scheduler_kwargs == {}
    trainer = example.main(["--lr_scheduler_type", "linear", "--max_steps", "2", "--output_dir", str(tmp_path / "b"),
                            "--config_overrides", "encoder.hidden_size=32,predictor.hidden_size=16",
                            "--embedded_num_images", "64", "--online_probe_steps", "0", "--use_cpu"])
    assert trainer.state.global_step == 2
    model, collator, data = tiny_trainer_parts()
    args = trainer_args(tmp_path, lr_scheduler_type="linear", lr_scheduler_kwargs={"start_lr": 1e-4})
    with pytest.raises(ValueError, match=r"lr_scheduler_kwargs \['start_lr'\] are options of the I-JEPA cosine "
                                         r"\(lr_scheduler_type='cosine'\), not of 'linear'"):
        IJepaTrainer(model=model, args=args, train_dataset=data, data_collator=collator)


def test_pretrain_trainer_resumes_bitwise_when_the_step_draws_random_numbers(tmp_path, load_example):
    """The loop's resume drew the data loader's base seed from the restored global generator (DropPath and SIGReg
    then drew other numbers); the Trainer restores the generator after making the epoch's iterator. Both stay
    exact: here the Trainer path, resumed mid-epoch (step 4) and at an epoch's end (step 6 of 6 per epoch)."""
    from tiny import TINY_OVERRIDES

    example = load_example("pretrain_trainer")
    argv = ["--config_overrides", TINY_OVERRIDES + ",encoder.drop_path_rate=0.2,sigreg_weight=0.05,"
            "regularized_embeddings=context_tokens", "--embedded_num_images", "48", "--per_device_train_batch_size",
            "8", "--save_strategy", "steps", "--save_steps", "2", "--online_probe_steps", "0", "--use_cpu",
            "--report_to", "none", "--max_steps", "8"]
    straight = example.main([*argv, "--output_dir", str(tmp_path / "straight")])
    for step in (4, 6):
        resumed = tmp_path / f"resumed_{step}"
        resumed.mkdir()
        shutil.copytree(tmp_path / "straight" / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
        again = example.main([*argv, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
        assert again.state.global_step == 8
        for name, value in straight.model.state_dict().items():
            assert torch.equal(value, again.model.state_dict()[name]), (step, name)


def test_both_paths_cards_report_what_the_run_measured(tmp_path):
    """A run with a held-out loss and the online probe wrote neither into its model card ("No evaluation results");
    both paths' cards now carry the last held-out loss and the last online k-NN (with raw pixels' beside it), read
    from the run's log rows by one function."""
    from ijepa_hf.data import MaskedBatchCollator, build_online_probe_set, build_pretraining_data, build_validation_data
    from ijepa_hf.training import OnlineProbeCallback
    from ijepa_hf.training.metrics import read_train_log
    from tiny import run

    loop = tmp_path / "loop"
    run(loop, "--eval_steps", "4", "--online_probe_steps", "4", "--online_probe_images", "16")
    rows = read_train_log(loop / "train_log.jsonl")
    last_eval = [row["eval_loss"] for row in rows if "eval_loss" in row][-1]
    last_knn = [row for row in rows if "online_knn_accuracy" in row][-1]
    card = _card_rows(loop)
    assert card["Held-out loss (last evaluation)"] == f"{last_eval:.5f} at step 8"
    assert card["Online k-NN accuracy (last probe)"] == (
        f"{last_knn['online_knn_accuracy']:.3f} at step 8 (raw pixels {last_knn['online_knn_pixels_accuracy']:.3f})")

    model, collator, _ = tiny_trainer_parts()
    data = build_pretraining_data(image_size=32, embedded_num_images=16, uint8_images=True)
    held_out = build_validation_data(image_size=32, max_eval_samples=8, uint8_images=True, batch_size=4)
    args = trainer_args(tmp_path / "t", eval_strategy="steps", eval_steps=4, per_device_eval_batch_size=4,
                        dataloader_drop_last=True, logging_steps=4)
    trainer = IJepaTrainer(model=model, args=args, train_dataset=data.dataset, eval_dataset=held_out.dataset,
                           data_collator=MaskedBatchCollator(collator))
    trainer.add_callback(OnlineProbeCallback(build_online_probe_set(data, image_size=32, num_images=16),
                                             every_n_steps=4))
    trainer.train()
    trainer.save_run(data_description="embedded")
    card = _card_rows(tmp_path / "t" / "trainer")
    evaluated = [row for row in trainer.state.log_history if "eval_loss" in row][-1]
    probed = [row for row in trainer.state.log_history if "online_knn_accuracy" in row][-1]
    assert card["Held-out loss (last evaluation)"] == f"{evaluated['eval_loss']:.5f} at step 4"
    assert card["Online k-NN accuracy (last probe)"] == (
        f"{probed['online_knn_accuracy']:.3f} at step 4 (raw pixels {probed['online_knn_pixels_accuracy']:.3f})")


def test_a_checkpoint_of_the_other_training_path_is_named_as_such(tmp_path, straight_run):
    """pretrain.py --resume_from_checkpoint <a Trainer checkpoint-N> said it "was not completely written (or comes from
    an older version of ijepa_hf)", and pretrain_trainer.py given a pretrain.py step_N said "its save was cut short
    ... start afresh": each is a complete checkpoint of the other script, and the message now says so and how to
    continue it. A missing folder got the Trainer's raw "[Errno 2] No such file or directory:
    .../trainer_state.json"."""
    from ijepa_hf.training import parse_args, pretrain
    from ijepa_hf.training.checkpointing import CheckpointError, check_trainer_checkpoint
    from tiny import tiny_argv

    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2),
                           train_dataset=data, data_collator=collator)
    trainer.train()
    checkpoint = tmp_path / "trainer" / "checkpoint-2"
    with pytest.raises(CheckpointError, match=r"is a checkpoint of transformers' Trainer \(examples/pretrain_trainer.py"
                                              r", IJepaTrainer\), not of pretrain.py: continue it with "
                                              r"pretrain_trainer.py --resume_from_checkpoint"):
        pretrain(parse_args(tiny_argv(tmp_path / "loop", "--resume_from_checkpoint", str(checkpoint))))
    with pytest.raises(CheckpointError, match=r"is a checkpoint of pretrain.py \(its checkpoint.json\), not of the "
                                              r"Trainer: continue it with pretrain.py --resume_from_checkpoint"):
        check_trainer_checkpoint(straight_run / "step_4")
    with pytest.raises(CheckpointError, match="there is no folder"):
        check_trainer_checkpoint(tmp_path / "nothere")
    # a run's output folder given for one of its checkpoints: "save cut short ... start afresh" / "not completely
    # written" before; now the newest complete checkpoint inside it is named
    with pytest.raises(CheckpointError, match=r"is a run's output folder, not one of its checkpoints: resume "
                                              r".*checkpoint-2"):
        check_trainer_checkpoint(tmp_path / "trainer")
    trainer.save_model()
    trainer.save_state()  # a finished run's folder holds trainer_state.json too ("the weights only" before)
    with pytest.raises(CheckpointError, match=r"is a run's output folder, not one of its checkpoints"):
        check_trainer_checkpoint(tmp_path / "trainer")
    with pytest.raises(CheckpointError, match=r"is a run's output folder, not one of its checkpoints: resume "
                                              r".*step_8"):
        pretrain(parse_args(tiny_argv(tmp_path / "loop2", "--resume_from_checkpoint", str(straight_run))))


def test_resuming_a_checkpoint_of_another_kind_of_model_names_the_kinds(tmp_path, load_example):
    """finetune.py --resume_from_checkpoint <a pretraining run's checkpoint-N> was refused with some eighty
    differences (every field of both configs, the data, the schedule) and not the one that matters: the checkpoint
    holds another kind of model. The kinds are now named, with the script that continues the checkpoint."""
    from ijepa_hf.training.resume import check_trainer_resume_compatible

    model, collator, data = tiny_trainer_parts()
    trainer = IJepaTrainer(model=model, args=trainer_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2),
                           train_dataset=data, data_collator=collator)
    trainer.train()
    classifier_config = model.export_encoder("target").config
    with pytest.raises(ValueError) as refused:
        check_trainer_resume_compatible(tmp_path / "trainer" / "checkpoint-2", {"learning_rate": 1.0},
                                        classifier_config)
    message = str(refused.value)
    assert "holds a model of type 'ijepa_hf_pretraining'; this run trains one of type 'ijepa_hf_encoder'" in message
    assert "pretrain_trainer.py" in message and message.count(" is ") < 6, message

"""The example scripts' start and end: one line for a user's error (the traceback on request) and no log line per
Hub request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ijepa_hf.scripts import configure_logging, run_script

from tiny import REPO_ROOT


def _pretrain(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("IJEPA_HF_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "pretrain.py"), *argv], env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_start_up_error_is_one_line_and_the_traceback_comes_with_debug(tmp_path):
    argv = ("--output_dir", str(tmp_path / "run"), "--config_overrides", "encoder.hiden_size=32")
    proc = _pretrain(*argv)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("pretrain.py: error: ") and "hiden_size" in lines[0] and "--debug" in lines[0]
    debug = _pretrain(*argv, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "hiden_size" in debug.stderr
    assert not (tmp_path / "run").exists()


def test_run_script_passes_bugs_through_with_their_traceback():
    def buggy(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_script(buggy, [])

    def wrong(argv):
        assert argv == ["--x", "1"]  # --debug is the runner's, not the script's
        raise ValueError("wrong value")

    with pytest.raises(ValueError):
        run_script(wrong, ["--x", "1", "--debug"])
    with pytest.raises(SystemExit) as stopped:
        run_script(wrong, ["--x", "1"])
    assert stopped.value.code == 2


def test_ctrl_c_is_one_line_naming_how_to_continue(capsys):
    """Ctrl-C in a run printed a traceback of wherever the step was (torch's attention, a data worker); it is one
    line with the conventional exit code 130, saying what a training run keeps and how it continues."""
    def interrupted(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_script(interrupted, [], on_interrupt="continue from the last checkpoint with --resume_from_checkpoint "
                                                 "latest")
    assert stopped.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ": interrupted (Ctrl-C): continue from the last checkpoint with --resume_from_checkpoint latest" in err
    with pytest.raises(SystemExit) as stopped:
        run_script(interrupted, [])
    assert stopped.value.code == 130 and capsys.readouterr().err.strip().endswith(": interrupted (Ctrl-C)")
    with pytest.raises(KeyboardInterrupt):
        run_script(interrupted, ["--debug"])


def test_the_scripts_do_not_log_every_hub_request(fake_hub, hf_home):
    from hub_utils import run_hub_script

    code = """
import logging, sys
from huggingface_hub import HfApi
from ijepa_hf.scripts import configure_logging
if sys.argv[1] == "scripts":
    configure_logging()
else:
    logging.basicConfig(level=logging.INFO)  # what the examples did
HfApi().create_repo("someone/log-check-" + sys.argv[1], exist_ok=True)
logging.getLogger("ijepa_hf").info("the package's own lines stay")
"""
    script = hf_home / "log_check.py"
    script.write_text(code)
    outputs = {}
    for mode in ("plain", "scripts"):
        proc = run_hub_script(f"import runpy, sys; sys.argv = ['x', {mode!r}]; runpy.run_path({str(script)!r})",
                              fake_hub, hf_home)
        outputs[mode] = proc.stdout + proc.stderr
    assert "HTTP Request" in outputs["plain"]  # the request line this test looks for
    assert "HTTP Request" not in outputs["scripts"] and "the package's own lines stay" in outputs["scripts"]


def test_run_script_ends_the_process_group_the_run_started(tmp_path):
    """A gloo process group left to the interpreter's shutdown sometimes aborted a finished run (`terminate called
    without an active exception`, exit -6), and `accelerate launch` then reported the job failed: the scripts' runner
    destroys it on the way out, after an error as after a success."""
    code = (
        "import os, torch.distributed as dist\n"
        "from ijepa_hf.scripts import run_script\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "def main(argv):\n"
        "    dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "    if argv: raise ValueError('a user error')\n"
        "try:\n"
        "    run_script(main, os.environ['ARGV'].split())\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code)\n"
        "print('initialized', dist.is_initialized())\n")
    from tiny import free_port

    for argv, printed in (("", "initialized False"), ("--fail", "exit 2\\ninitialized False")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PORT": str(free_port()), "ARGV": argv})
        assert proc.returncode == 0 and proc.stdout.strip() == printed.replace("\\n", "\n"), proc.stderr[-2000:]


@pytest.mark.parametrize("script", ["extract_features", "probe"])
def test_a_device_this_machine_lacks_is_refused_before_any_work(tmp_path, load_example, monkeypatch, script):
    """extract_features.py / probe.py --device cuda on a machine without CUDA read the data and loaded the model, then
    stopped with torch's traceback ("AssertionError: Torch not compiled with CUDA enabled"); a GPU index the machine
    lacks, or no device at all, went as far. Each is refused at the start, naming --device and what to give."""
    import torch

    from ijepa_hf.scripts import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu" and resolve_device("cpu") == "cpu"
    example = load_example(script)

    def no_work(*args, **kwargs):
        raise AssertionError("data or a model was read before --device was checked")

    for name in ("load_encoder", "load_labeled_splits", "load_image_dataset", "load_builtin_split", "encoder_depth"):
        if hasattr(example, name):
            monkeypatch.setattr(example, name, no_work)
    argv = ["--model_name_or_path", str(tmp_path / "m"), "--dataset_name", "procedural_shapes"]
    argv += ["--output", str(tmp_path / "f.npz")] if script == "extract_features" else []
    with pytest.raises(ValueError, match=r"--device cuda: this torch sees no CUDA GPU .*--device cpu"):
        example.main([*argv, "--device", "cuda"])
    with pytest.raises(ValueError, match=r"--device 'gpu0' is not a torch device.*cpu, cuda or cuda:N"):
        example.main([*argv, "--device", "gpu0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        example.main([*argv, "--device", "cuda:2"])
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device(None) == "cuda"

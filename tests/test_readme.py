"""The README's commands and Python examples run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from tiny import REPO_ROOT, free_port, tiny_argv

README = REPO_ROOT / "README.md"


def test_pretraining_from_python_snippet_runs():
    text = README.read_text()
    section = text[text.index("### Pretraining from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0
    assert type(namespace["encoder"]).__name__ == "IJepaEncoderModel"


def test_readme_multi_process_cpu_command_runs_as_written(tmp_path):
    """The README's data-parallel CPU command, with its ``...`` filled in by a tiny run: two processes train."""
    line = next(line for line in README.read_text().splitlines() if line.startswith("ACCELERATE_USE_CPU=1"))
    words = shlex.split(line.split("#")[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    while "=" in words[0]:  # the leading VAR=value assignments
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    assert words[:2] == ["accelerate", "launch"] and words[-1] == "..."
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()),
               *words[2:-1], *tiny_argv(tmp_path / "run", images=32, batch=4, steps=2)]
    proc = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "MULTI_CPU" in output and "processes = 2" in output
    assert (tmp_path / "run" / "model.safetensors").is_file() and (tmp_path / "run" / "encoder").is_dir()


def test_dense_features_snippet_gives_the_head_the_pretrained_backbone(tmp_path):
    """The README's dense-head example built `UperNetForSemanticSegmentation(UperNetConfig(backbone_config=...))`
    from the pretrained backbone's config: transformers 5 builds a head's backbone from its config alone, so the
    segmenter it showed had freshly initialised weights, not I-JEPA's. Run as written (its repo names pointed at a
    saved encoder), the segmenter's backbone now holds the pretrained weights."""
    import torch

    from ijepa_hf import IJepaEncoderModel
    from tiny import tiny_encoder_config

    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=12))
    encoder.save_pretrained(tmp_path / "encoder")
    text = README.read_text()
    section = text[text.index("### Dense features"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for name in ("path/to/encoder", "org/encoder-repo"):
        code = code.replace(f'"{name}"', repr(str(tmp_path / "encoder")))
    namespace: dict = {"pixel_values": torch.randn(1, 3, 32, 32)}
    exec(compile(code, "README.md", "exec"), namespace)
    expected = encoder.state_dict()
    held = namespace["segmenter"].backbone.state_dict()
    differing = [key for key, value in held.items() if not torch.equal(value, expected[key])]
    assert not differing, f"the segmenter's backbone is not the pretrained encoder: {differing[:5]}"

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

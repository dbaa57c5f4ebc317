"""The README's Python pretraining example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_pretraining_from_python_snippet_runs():
    text = README.read_text()
    section = text[text.index("### Pretraining from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"].item() > 0
    assert type(namespace["encoder"]).__name__ == "IJepaEncoderModel"


def test_readme_gives_the_multi_process_cpu_recipe():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "ACCELERATE_USE_CPU=1" in readme and "--multi_gpu --num_processes 2" in readme

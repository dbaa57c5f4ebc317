"""Helpers for tests that talk to the in-repo fake Hub (``tests/fake_hub.py``).

``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HOME`` once, at import time, and the
pytest process has usually imported it already. Hub round trips therefore run in a fresh Python subprocess
whose environment points at the fake server and at a private cache; that also proves that what was pushed
can be loaded by a process that shares no in-memory state (registries, module caches) with the pusher.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

# Variables that would make a child process reach a real Hub, use a real token or a shared cache.
_SCRUBBED = ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
             "TRANSFORMERS_CACHE", "HF_MODULES_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
             "HF_TOKEN_PATH", "HF_XET_CACHE")


def hub_env(endpoint: str, hf_home: Path | str, offline: bool = False) -> dict[str, str]:
    """The environment for a child process that uses ``endpoint`` as its Hub and ``hf_home`` as its cache."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(hf_home),
        HF_TOKEN="dummy",  # the fake Hub accepts any token; a token avoids anonymous-only code paths
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",  # keeps captured output readable when a test fails
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_hub_script(
    code: str,
    endpoint: str,
    hf_home: Path | str,
    offline: bool = False,
    *,
    cwd: Path | str | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run the Python snippet ``code`` in a fresh interpreter wired to a (fake) Hub.

    The child gets ``HF_ENDPOINT=endpoint``, ``HF_HOME=hf_home``, ``HF_TOKEN=dummy``, telemetry off,
    ``HF_HUB_OFFLINE=1`` if ``offline``, and the repo root plus ``tests/`` on ``PYTHONPATH``. With ``check``
    (the default) a non-zero exit raises ``AssertionError`` showing the child's stdout and stderr, so a failing
    pytest report contains the real traceback.
    """
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=hub_env(endpoint, hf_home, offline),
        cwd=str(cwd) if cwd is not None else None,
        stdin=subprocess.DEVNULL,  # never a TTY: transformers would otherwise *prompt* on trust_remote_code
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"hub script failed with exit code {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc

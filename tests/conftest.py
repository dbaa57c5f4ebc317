"""Shared pytest fixtures.

Hub fixtures: ``fake_hub`` (an in-memory Hub server, see ``tests/fake_hub.py``) and ``run_hub_script``
(re-exported from ``tests/hub_utils.py``) to run a snippet in a subprocess wired to it. Other fixtures may be
added below by other modules' authors.
"""

from __future__ import annotations

import os
import sys

# huggingface_hub (and datasets, evaluate) read HF_HUB_OFFLINE once, when first imported: set it before anything
# imports them, so no in-process test reaches for the Hub. Hub tests run their clients in subprocesses with their
# own environment (`hub_utils.hub_env`).
os.environ["HF_HUB_OFFLINE"] = "1"
from collections.abc import Iterator
from pathlib import Path

import pytest

# Make `fake_hub` / `hub_utils` importable whatever pytest's import mode (prepend or importlib).
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from fake_hub import FakeHub  # noqa: E402
from hub_utils import run_hub_script  # noqa: E402,F401  (re-exported for tests: `from conftest import ...` is fragile)


@pytest.fixture(scope="session")
def fake_hub_server() -> Iterator[FakeHub]:
    """One in-memory Hub for the whole session; tests use distinct repo names so they do not collide."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def fake_hub(fake_hub_server: FakeHub) -> str:
    """The endpoint URL (``http://127.0.0.1:<port>``) of the session's fake Hub."""
    return fake_hub_server.endpoint


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    """A private, empty ``HF_HOME`` for a test's Hub subprocesses."""
    path = tmp_path / "hf_home"
    path.mkdir()
    return path


def _script_loader(folder: str, prefix: str, on_path: bool = False):
    """``load(name)`` imports ``<repo>/<folder>/<name>.py`` as a module, once (scripts are not a package), so tests
    call it in-process instead of paying a subprocess start-up. ``on_path``: the folder goes on ``sys.path``, as
    ``python <folder>/<name>.py`` puts it there for the script's imports of its siblings."""
    import importlib.util

    scripts = Path(__file__).resolve().parents[1] / folder
    if on_path and str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    loaded: dict[str, object] = {}

    def load(name: str):
        if name not in loaded:
            spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", scripts / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
            spec.loader.exec_module(module)
            loaded[name] = module
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def load_example():
    """``load_example("finetune")``: ``examples/finetune.py`` as a module."""
    return _script_loader("examples", "ijepa_hf_example")


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("bench_gpu")``: ``benchmarks/bench_gpu.py`` as a module (its folder on ``sys.path``)."""
    return _script_loader("benchmarks", "ijepa_hf_benchmark", on_path=True)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Keep an in-process training run on one thread (the CI machine is small and shared)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory) -> Path:
    """An uninterrupted 8-step run of the tiny config (test_pretraining's ``run``) with checkpoints at steps 4 and
    8: 48 images in batches of 8 (6 batches per epoch), so a resume at step 4 crosses an epoch boundary."""
    import torch
    from tiny import run

    out = tmp_path_factory.mktemp("straight") / "run"
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    run(out, "--checkpointing_steps", "4")
    torch.set_num_threads(previous)
    return out

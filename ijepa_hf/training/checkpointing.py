"""Checkpoints of a pretraining run: the output-folder policy, the run lock, atomic saves, discovery, pruning and a
load that runs no code. What a checkpoint's loop state holds and how a run resumes from it is :mod:`.resume`'s.

Layout of ``output_dir``::

    run.json                 the run's identity (``run_id``), written when the run starts
    _ijepa_hf.lock           held (``flock``) by the process that trains into the folder
    train_log.jsonl          see ijepa_hf.training.metrics
    step_<N>/                a complete checkpoint: accelerate's ``save_state`` files + checkpoint.json
    .step_<N>.incomplete/    a checkpoint being written (never read)

A checkpoint is written under its ``.incomplete`` name, every file is flushed to disk, ``checkpoint.json`` (the
manifest: run id, step, the loop's own state as JSON, the size and SHA-256 of every file) is written last, and the
folder is published by a rename — so a process killed at any instant leaves either the previous set of complete checkpoints
or one more, never a ``step_<N>`` that cannot be loaded. Folders named ``step_<N>`` without a valid manifest
(older versions, or copies cut short) are skipped with a warning. The digests of the files accelerate writes
through its ``save`` (model weights, optimizer, scheduler) are computed from the bytes as they are written, not by
reading multi-GB files back; the small files written otherwise (RNG states, a gradient scaler) and the shards of
FSDP / DeepSpeed engines are read as they are flushed. A resume refuses a file whose digest differs, naming it.

The checkpoints a transformers ``Trainer`` writes (``checkpoint-<N>``: ``IJepaTrainer``, the fine-tuning script)
are not atomic; :func:`latest_trainer_checkpoint` skips the ones a kill cut short.

Nothing is unpickled beyond plain tensors and numbers: the loop's own state is JSON in the manifest, and
accelerate (>= 1.1) reads model, optimizer, scaler and RNG files with ``torch.load(weights_only=True)``; no custom
object is registered with ``accelerator.register_for_checkpointing`` (accelerate loads those with
``weights_only=False``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..pretrained_loading import CHECKPOINT_MANIFEST_NAME

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "TRAINER_STATE_NAME",
    "RUN_FILE_NAME",
    "LOCK_FILE_NAME",
    "NOT_PUBLISHED_PREFIX",
    "LEGACY_LOCK_FILE_NAME",
    "LEGACY_NAMES",
    "CheckpointInfo",
    "RunFolder",
    "CheckpointError",
    "OutputDirLock",
    "OutputDirInUseError",
    "prepare_output_dir",
    "check_output_dir_options",
    "list_checkpoints",
    "latest_checkpoint",
    "latest_trainer_checkpoint",
    "prepare_trainer_output_dir",
    "resolve_trainer_checkpoint",
    "check_trainer_checkpoint",
    "trainer_checkpoint_problem",
    "save_checkpoint",
    "read_manifest",
    "load_checkpoint",
    "prune_checkpoints",
    "verify_digests",
    "write_run_file",
    "is_disk_full",
    "write_failure",
]

MANIFEST_NAME = CHECKPOINT_MANIFEST_NAME  # what makes a folder a checkpoint (the model loaders name it as one)
RUN_FILE_NAME = "run.json"
TRAINER_STATE_NAME = "trainer_state.json"  # transformers.trainer.TRAINER_STATE_NAME
# A run's own bookkeeping in its folder (the lock, checkpoints moved aside) starts with `_`: neither this package's
# push nor Trainer's (which leaves out `_*`) publishes it.
NOT_PUBLISHED_PREFIX = "_"
LOCK_FILE_NAME = f"{NOT_PUBLISHED_PREFIX}ijepa_hf.lock"
# What versions before 2026-12-06 named them: still recognised in a folder they wrote.
LEGACY_LOCK_FILE_NAME = ".ijepa_hf.lock"
LEGACY_NAMES = (LEGACY_LOCK_FILE_NAME, "abandoned-*", "replaced-*")
MANIFEST_FORMAT = 1
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
_INCOMPLETE_RE = re.compile(r"^\.step_(\d+)\.incomplete$")
# Files a fresh run may find in its output folder without it holding another run.
_IGNORED_IN_EMPTY_DIR = {LOCK_FILE_NAME, LEGACY_LOCK_FILE_NAME, ".DS_Store"}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or loaded; the message says why and what to do."""


class OutputDirInUseError(RuntimeError):
    """Another process is training into the same output folder."""


# ----------------------------------------------------------------------------------------------------------------
# The run lock
# ----------------------------------------------------------------------------------------------------------------


_TOKEN_OPTIONS = ("--hub_token", "--token")


def _without_tokens(argv: list[str]) -> str:
    """The command line with the values of its token options as ``***``: the lock file records it, and a second run
    prints it."""
    words = []
    for i, word in enumerate(argv):
        if i and argv[i - 1] in _TOKEN_OPTIONS:
            word = "***"
        elif word.startswith(tuple(f"{option}=" for option in _TOKEN_OPTIONS)):
            word = word.split("=", 1)[0] + "=***"
        words.append(word)
    return " ".join(words)


class OutputDirLock:
    """An exclusive ``flock`` on ``output_dir/_ijepa_hf.lock`` for the lifetime of a run (main process only).

    A second run into the same folder fails at once with :class:`OutputDirInUseError` naming the holder (pid,
    host, start time, command). The kernel drops the lock when the holder dies, even by ``kill -9``. ``flock`` is
    reliable on local file systems; on network file systems it may not exclude processes on other hosts.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE_NAME
        self._handle: Any = None
        self._earlier: Any = None  # the earlier version's lock file, where one was left (see acquire)

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self._lock(self.path, "a+")
        # A folder an earlier version trained in has its lock file under the earlier name: held as well, so that a
        # run of that version still training there excludes this one, and this one excludes a later start of it.
        legacy = self.path.parent / LEGACY_LOCK_FILE_NAME
        if legacy.is_file():
            try:
                self._earlier = self._lock(legacy, "r", holder_note=", an earlier version of ijepa-hf")
            except OutputDirInUseError:
                handle.close()
                raise
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "command": _without_tokens(sys.argv)[:500]}))
        handle.flush()
        self._handle = handle
        return self

    def _lock(self, path: Path, mode: str, holder_note: str = "") -> Any:
        """``path`` opened and locked exclusively (the open file, held until :meth:`release`), or
        :class:`OutputDirInUseError` naming the holder the file records."""
        import fcntl

        handle = open(path, mode, encoding="utf-8")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = handle.read().strip() or "unknown holder"
            handle.close()
            raise OutputDirInUseError(
                f"{self.path.parent} is in use by another run ({holder}{holder_note}); wait for it to finish or stop "
                "it, or choose another --output_dir"
            ) from error
        return handle

    def still_held(self) -> bool:
        """Whether the lock file this process holds is still the one at ``path`` (a folder deleted, or moved
        away, while the run trains takes the lock file with it)."""
        if self._handle is None:
            return False
        try:
            here, held = os.stat(self.path), os.fstat(self._handle.fileno())
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)

    def reacquire(self) -> None:
        """Lock ``path`` anew (recreating the folder) after :meth:`still_held` turned false;
        :class:`OutputDirInUseError` when another run holds it by now."""
        for name in ("_handle", "_earlier"):
            stale = getattr(self, name)
            if stale is not None:
                stale.close()  # drops its lock with it
                setattr(self, name, None)
        self.acquire()

    def release(self) -> None:
        import fcntl

        for name in ("_handle", "_earlier"):
            handle = getattr(self, name)
            if handle is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                handle.close()
                setattr(self, name, None)

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    run_id: str | None  # None: no valid manifest
    problem: str | None = None  # why it is incomplete (None: complete)

    @property
    def complete(self) -> bool:
        return self.problem is None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete checkpoint; :class:`CheckpointError` naming what is missing otherwise."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not manifest_path.is_file() and (path / TRAINER_STATE_NAME).is_file():
        raise CheckpointError(
            f"{path} is a checkpoint of transformers' Trainer (examples/pretrain_trainer.py, IJepaTrainer), not of "
            f"pretrain.py: continue it with pretrain_trainer.py --resume_from_checkpoint {path}, or start a "
            "pretrain.py run from its weights with --model_name_or_path and the Trainer run's output folder")
    if not manifest_path.is_file() and (newest := latest_checkpoint(path)) is not None:
        raise CheckpointError(f"{path} is a run's output folder, not one of its checkpoints: resume {newest.path}, "
                              f"its newest complete checkpoint, or give --output_dir {path} --resume_from_checkpoint "
                              "latest")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} has no {MANIFEST_NAME}: it was not completely written (or comes from an "
                              "older version of ijepa_hf)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path} cannot be read: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest_path} is not an ijepa_hf checkpoint manifest (format {MANIFEST_FORMAT})")
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise CheckpointError(f"{path} is incomplete: {name} has {file.stat().st_size} bytes, the manifest "
                                  f"says {size}")
    return manifest


def list_checkpoints(output_dir: str | os.PathLike) -> list[CheckpointInfo]:
    """Every ``step_<N>`` folder of ``output_dir``, by step, each complete or with the reason it is not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if not (match and path.is_dir()):
            continue
        try:
            manifest = read_manifest(path)
        except CheckpointError as error:
            found.append(CheckpointInfo(int(match.group(1)), path, None, str(error)))
        else:
            found.append(CheckpointInfo(int(match.group(1)), path, manifest.get("run_id")))
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(output_dir: str | os.PathLike, run_id: str | None = None) -> CheckpointInfo | None:
    """The newest *complete* checkpoint (of run ``run_id`` when given); incomplete ones newer than it are skipped
    with a warning naming them."""
    chosen = None
    for info in reversed(list_checkpoints(output_dir)):
        if not info.complete:
            logger.warning("Skipping checkpoint %s: %s", info.path, info.problem)
            continue
        if run_id is not None and info.run_id != run_id:
            continue
        chosen = info
        break
    return chosen


# ----------------------------------------------------------------------------------------------------------------
# A transformers Trainer's checkpoints (IJepaTrainer, the fine-tuning script)
# ----------------------------------------------------------------------------------------------------------------

_TRAINER_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def trainer_checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the Trainer checkpoint folder ``path`` cannot be resumed, or ``None``. Trainer writes a checkpoint's
    files in place, one after the other, ``trainer_state.json`` last (weights, optimizer, scheduler and RNG states
    first), so a folder without a readable one was cut short by a kill during its save."""
    state = Path(path) / TRAINER_STATE_NAME
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_NAME} (written last), so its save was cut short"
    except (OSError, ValueError) as error:
        return f"its {TRAINER_STATE_NAME} cannot be read ({error}), so its save was cut short"
    return None


def latest_trainer_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-<N>`` folder of ``output_dir`` (``None``: none); newer folders cut short
    (:func:`trainer_checkpoint_problem`) are skipped with a warning naming them, where transformers'
    ``get_last_checkpoint`` would return them and the resume would stop on the missing file."""
    for _, path in reversed(_trainer_checkpoints(Path(output_dir))):
        problem = trainer_checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Skipping checkpoint %s: %s", path, problem)
    return None


def check_trainer_checkpoint(path: str | os.PathLike) -> None:
    """Refuse to resume a Trainer checkpoint folder that was cut short, naming the newest complete one of its folder,
    or that holds the weights only (``save_only_model``: Trainer would resume it with a fresh optimizer, learning-rate
    schedule and RNG, the warm-up again in the middle of the run), or that is not a folder, or is a checkpoint of
    ``pretrain()`` (named as such, with the command that continues it)."""
    if not Path(path).is_dir():
        raise CheckpointError(f"cannot resume from {path}: there is no folder {os.path.abspath(path)}; give a "
                              "checkpoint-N folder of a Trainer run, or `latest`")
    if (Path(path) / MANIFEST_NAME).is_file():
        raise CheckpointError(
            f"cannot resume from {path}: it is a checkpoint of pretrain.py (its {MANIFEST_NAME}), not of the Trainer: "
            f"continue it with pretrain.py --resume_from_checkpoint {path}, or start a Trainer run from its weights "
            "with --model_name_or_path and that run's output folder")
    if (inside := latest_trainer_checkpoint(path)) is not None:  # a checkpoint holds no checkpoint-* of its own
        raise CheckpointError(f"cannot resume from {path}: it is a run's output folder, not one of its checkpoints: "
                              f"resume {inside}, its newest complete checkpoint, or give --output_dir {path} "
                              "--resume_from_checkpoint latest")
    if (problem := trainer_checkpoint_problem(path)) is not None:
        newest = latest_trainer_checkpoint(Path(path).parent)
        raise CheckpointError(f"cannot resume from {path}: {problem}. "
                              + (f"Resume from {newest}, the newest complete checkpoint of its folder, or with "
                                 "`latest`." if newest else "Its folder has no complete checkpoint: start afresh."))
    if not any(item.name.startswith(("optimizer", "global_step")) for item in Path(path).iterdir()):
        raise CheckpointError(
            f"cannot resume from {path}: it holds the weights only (saved with save_only_model), without the "
            "optimizer, learning-rate schedule and RNG states the run needs to continue (Trainer would start them "
            "afresh, the lr warm-up again in the middle of the run). Resume from a checkpoint saved without "
            "save_only_model, or start a new run.")


# What a run writes into its output folder besides its checkpoints (``pretrain()``'s and the Trainer scripts': the
# model, sharded or not, its processor, results, cards, log, curves, the demo's mask picture, encoder/, run file):
# an overwriting run moves the other run's aside with its checkpoints, so that nothing of it is reported, resumed or
# published as the new run's.
_RUN_OUTPUTS = ("README.md", "config.json", "model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "preprocessor_config.json", "*_results.json", "trainer_state.json", "train_log.jsonl",
                "train_log.jsonl.corrupt-*", "training_curves.png", "masks.png", "training_args.bin", "encoder",
                RUN_FILE_NAME)


def _run_outputs(output_dir: Path) -> list[Path]:
    """The files and folders of :data:`_RUN_OUTPUTS` in ``output_dir``."""
    if not output_dir.is_dir():
        return []
    return sorted({path for pattern in _RUN_OUTPUTS for path in output_dir.glob(pattern)})


def _trainer_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-<N>`` folders of ``output_dir``, by step."""
    if not output_dir.is_dir():
        return []
    return sorted((int(match.group(1)), path) for path in output_dir.iterdir()
                  if (match := _TRAINER_CHECKPOINT_RE.match(path.name)) and path.is_dir())


def _listing(names: list[str]) -> str:
    """The first names of a folder's contents, for a message."""
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _replace_other_run(output_dir: Path, paths: list[Path]) -> None:
    """An overwriting run's move of the other run's checkpoints and outputs ``paths`` aside, with its warning."""
    aside = _move_aside(output_dir, paths, "replaced")
    logger.warning("--overwrite_output_dir: the other run's checkpoints and outputs (%s) were moved to %s (delete it "
                   "once you no longer need them)", _listing([path.name for path in paths]), aside)


def _move_aside(output_dir: Path, paths: list[Path], prefix: str) -> Path:
    """Move ``paths`` (files and folders of ``output_dir``) whole into a new ``_<prefix>-<time>`` folder there (not
    published: see :data:`NOT_PUBLISHED_PREFIX`); returns it."""
    aside = output_dir / f"{NOT_PUBLISHED_PREFIX}{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    aside.mkdir()
    for path in paths:
        os.replace(path, aside / path.name)
    _fsync_dir(output_dir)
    return aside


def resolve_trainer_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """A Trainer script's ``--resume_from_checkpoint``: ``"latest"`` is :func:`latest_trainer_checkpoint` (``None``:
    none yet, a fresh start), anything else a checkpoint path; either is refused when it cannot be resumed
    (:func:`check_trainer_checkpoint`)."""
    path = latest_trainer_checkpoint(output_dir) if value == "latest" else value
    if path is not None:
        check_trainer_checkpoint(path)
    return path


def prepare_trainer_output_dir(output_dir: str | os.PathLike, *, resume_from_checkpoint: str | None,
                               overwrite_output_dir: bool,
                               check_resume: Callable[[Path], None] | None = None) -> str | None:
    """The output-folder policy of the Trainer scripts (``pretrain_trainer.py``, ``finetune.py``), as
    :func:`prepare_output_dir`'s for ``pretrain()`` (main process first). Returns the checkpoint to resume
    (:func:`resolve_trainer_checkpoint` of ``resume_from_checkpoint``), or ``None``. Nothing is deleted.

    * A new run into a folder holding another run's checkpoints or outputs is refused, naming
      ``--resume_from_checkpoint latest`` and ``--overwrite_output_dir`` (``latest`` with no complete checkpoint to
      continue is refused as well: it would start anew over the other run). An overwriting run moves the other run's
      ``checkpoint-*`` and outputs (model, results, cards, log) into one ``_replaced-<time>`` folder: Trainer's
      checkpoints carry no run identity, so left in place ``latest`` would resume them, and Trainer's rotation
      (``save_total_limit``) would prune the new run's checkpoints before them; Trainer's ``save_metrics`` merges
      into an ``all_results.json`` it finds, so the new run would report the other run's results as its own.
    * Resuming ``checkpoint-<N>`` moves the folder's later ``checkpoint-*`` (the branch the resume abandons, or folders
      a kill cut short) into one ``_abandoned-<time>`` folder, so that ``latest`` never mixes the two branches.
      Resuming another folder's checkpoint is refused when this folder holds a run (its checkpoints would be written
      among that run's), as :func:`prepare_output_dir` refuses it.
    * ``check_resume(checkpoint)`` (the run's settings against the checkpoint's; it raises to refuse) runs before
      anything in the folder moves: a refused resume leaves it as it was.
    """
    output_dir = Path(output_dir)
    check_output_dir_options(overwrite_output_dir, resume_from_checkpoint)
    resume_from = resolve_trainer_checkpoint(resume_from_checkpoint, output_dir)
    checkpoints, outputs = _trainer_checkpoints(output_dir), _run_outputs(output_dir)
    held = [path for _, path in checkpoints] + outputs
    listed = _listing([path.name for path in held])
    if resume_from is not None:
        resumed = Path(resume_from).resolve()
        elsewhere = not resumed.is_relative_to(output_dir.resolve())  # another folder's checkpoint
        if elsewhere and held:  # its checkpoints would be written among another run's, over those whose steps meet
            raise ValueError(
                f"--output_dir {output_dir} holds another run ({listed}) than the checkpoint {resume_from}: "
                f"resume into the checkpoint's own folder ({resumed.parent}) or an empty one")
        if check_resume is not None:
            check_resume(Path(resume_from))
        if elsewhere:
            return resume_from
        # The folder's checkpoints from its step on, other than itself (a later branch, or an abandoned one taken
        # up again from the folder it was set aside in), would be resumed by `latest` or overwritten in place
        match = _TRAINER_CHECKPOINT_RE.match(resumed.name)
        later = [path for step, path in checkpoints if match and step >= int(match.group(1))
                 and path.resolve() != resumed]
        if later:
            aside = _move_aside(output_dir, later, "abandoned")
            logger.warning("Resuming from %s abandons the later checkpoints %s: moved to %s (delete it once you no "
                           "longer need them)", resumed.name, ", ".join(path.name for path in later), aside)
        return resume_from
    if held and resume_from_checkpoint == "latest":
        raise ValueError(
            f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint to continue from, but holds "
            f"another run ({listed}); starting anew would mix into it. "
            "Use --overwrite_output_dir (without --resume_from_checkpoint) to start a new run there, or choose "
            "another --output_dir.")
    if held and not overwrite_output_dir:
        raise ValueError(
            f"--output_dir {output_dir} already holds another run ({listed}). Use --resume_from_checkpoint latest "
            "to continue it, --overwrite_output_dir to start a new run there, or choose another --output_dir.")
    if held:
        _replace_other_run(output_dir, held)
    return None


# ----------------------------------------------------------------------------------------------------------------
# The output-folder policy
# ----------------------------------------------------------------------------------------------------------------


def _read_run_file(output_dir: Path) -> dict[str, Any]:
    try:
        run = json.loads((output_dir / RUN_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return run if isinstance(run, dict) and isinstance(run.get("run_id"), str) else {}


def _read_run_id(output_dir: Path) -> str | None:
    return _read_run_file(output_dir).get("run_id")


def write_run_file(output_dir: str | os.PathLike, run_id: str, finished_step: int | None = None) -> None:
    """``run.json``: the run's id, and once its final model is written, the step it finished at."""
    run: dict[str, Any] = {"run_id": run_id}
    if finished_step is not None:
        run["finished_step"] = int(finished_step)
    _write_json_atomic(Path(output_dir) / RUN_FILE_NAME, run)


def _write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, default=str)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class RunFolder:
    """What :func:`prepare_output_dir` decided: the run's id and the checkpoint to resume from (if any)."""

    run_id: str
    resume_from: Path | None


def check_output_dir_options(overwrite_output_dir: bool, resume_from_checkpoint: str | None) -> None:
    """Refuse asking for a new run and a continued one at once (checked when the arguments are parsed, and again
    by :func:`prepare_output_dir` for callers that skip the parser)."""
    if overwrite_output_dir and resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: give "
                         "only one of them")


def prepare_output_dir(output_dir: str | os.PathLike, *, resume_from_checkpoint: str | None,
                       overwrite_output_dir: bool, check_resume: Callable[[Path], None] | None = None) -> RunFolder:
    """Apply the output-folder policy of transformers' example scripts (main process, lock held).

    * A fresh run needs an empty (or absent) folder, or ``overwrite_output_dir``; a folder holding another run is
      refused with an error naming ``--overwrite_output_dir`` and ``--resume_from_checkpoint``. An overwriting run
      gets a new run id and moves the other run's checkpoints and outputs (final model, ``encoder/``, cards, log,
      curves) into one ``_replaced-<time>`` folder: until it wrote its own, a push or a load of the folder took the
      other run's model for this one's. Nothing is deleted.
    * ``resume_from_checkpoint="latest"`` continues the folder's run from its newest complete checkpoint; without
      one it starts that run afresh (a run that never reached its first checkpoint) — or, when the folder holds
      something else, refuses as above.
    * ``resume_from_checkpoint=<path>`` continues the run of that checkpoint.

    ``check_resume(checkpoint)`` (the run's settings against the checkpoint's; it raises to refuse) runs before
    anything in the folder moves: a refused resume leaves it as it was (resuming an earlier checkpoint moves the
    later ones aside).
    """
    output_dir = Path(output_dir)
    check_output_dir_options(overwrite_output_dir, resume_from_checkpoint)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.iterdir():  # what a killed save left behind
        if _INCOMPLETE_RE.match(stale.name):
            logger.warning("Removing %s, a checkpoint that was being written when its run stopped", stale)
            shutil.rmtree(stale, ignore_errors=True)
    run_id = _read_run_id(output_dir)
    contents = sorted(p.name for p in output_dir.iterdir() if p.name not in _IGNORED_IN_EMPTY_DIR)
    refuse = ValueError(
        f"--output_dir {output_dir} already holds another run ({_listing(contents)}). Use --resume_from_checkpoint "
        "latest to continue it, --overwrite_output_dir to start a new run there, or choose another --output_dir."
    )
    if resume_from_checkpoint == "latest":
        if run_id is None and contents:
            # A folder from an older version has no run.json: adopt the run of its newest complete checkpoint.
            found = latest_checkpoint(output_dir)
            if found is None:
                raise refuse
            run_id = found.run_id
        found = latest_checkpoint(output_dir, run_id) if run_id is not None else None
        broken = [info for info in list_checkpoints(output_dir) if not info.complete]
        if found is None and broken:
            # Starting afresh would overwrite them: a human should look first.
            raise CheckpointError(
                f"--resume_from_checkpoint latest: {output_dir} has no complete checkpoint, only incomplete ones ("
                + "; ".join(f"{info.path.name}: {info.problem}" for info in broken)
                + "). Move them away to start the run afresh, or use --overwrite_output_dir.")
        finished = _read_run_file(output_dir).get("finished_step")
        if found is None and finished is not None:
            # Its final model is written: starting afresh would train it all again (e.g. to retry a failed push).
            raise ValueError(
                f"--resume_from_checkpoint latest: the run in {output_dir} finished (step {finished}, its final model "
                f"is written) and has no checkpoint to continue from (a run writes them with --checkpointing_steps; "
                f"--extend_run lengthens a run from one). Publish it with `ijepa-hf push {output_dir} <repo_id>`; "
                "train a new run with --overwrite_output_dir or another --output_dir.")
        if found is None:
            logger.warning("--resume_from_checkpoint latest: no complete checkpoint of this run in %s, starting "
                           "it from scratch", output_dir)
            run_id = run_id or uuid.uuid4().hex
            write_run_file(output_dir, run_id)
            return RunFolder(run_id, None)
        if check_resume is not None:
            check_resume(found.path)
        _move_abandoned_branch(output_dir, run_id, found.step)
        return RunFolder(run_id, found.path)
    if resume_from_checkpoint:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint "
                                    "folder (give a step_<N> folder or 'latest')")
        manifest = read_manifest(path)
        if run_id is not None and run_id != manifest["run_id"] and not path.resolve().is_relative_to(
                output_dir.resolve()):
            raise ValueError(f"--output_dir {output_dir} holds another run than the checkpoint {path}: resume into "
                             "the checkpoint's own folder or an empty one")
        if check_resume is not None:
            check_resume(path)
        write_run_file(output_dir, manifest["run_id"])
        _move_abandoned_branch(output_dir, manifest["run_id"], int(manifest["step"]))
        return RunFolder(manifest["run_id"], path)
    if contents and not overwrite_output_dir:
        raise refuse
    replaced = [info.path for info in list_checkpoints(output_dir)] + _run_outputs(output_dir)
    if replaced:
        _replace_other_run(output_dir, replaced)
    run_id = uuid.uuid4().hex
    write_run_file(output_dir, run_id)
    return RunFolder(run_id, None)


def _move_abandoned_branch(output_dir: Path, run_id: str, step: int) -> list[Path]:
    """Resuming this run from ``step`` abandons its checkpoints after it: they are moved, whole, into one
    ``_abandoned-<time>`` folder (a warning names them) before anything else, so that neither ``latest`` nor pruning
    ever mixes the two branches. Other runs' checkpoints stay where they are."""
    newer = [info for info in list_checkpoints(output_dir)
             if info.step > step and info.run_id in (run_id, None)]
    if not newer:
        return []
    aside = _move_aside(output_dir, [info.path for info in newer], "abandoned")
    moved = [aside / info.path.name for info in newer]
    logger.warning("Resuming from step %d abandons the later checkpoints %s of this run: moved to %s (delete it "
                   "once you no longer need them)", step, ", ".join(info.path.name for info in newer), aside)
    return moved


# ----------------------------------------------------------------------------------------------------------------
# Save / load / prune
# ----------------------------------------------------------------------------------------------------------------


_DIGEST_CHUNK = 1 << 24


def _sha256_of_file(path: Path, handle: Any = None) -> str:
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        handle = handle or stack.enter_context(open(path, "rb"))
        while chunk := handle.read(_DIGEST_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path, digests: Mapping[str, str]) -> tuple[dict[str, int], dict[str, str]]:
    """Flush every file under ``root`` to disk; returns ``({relative path: size}, {relative path: sha256})``.
    ``digests``: those computed while the files were written; the other files are read for theirs."""
    sizes, all_digests = {}, {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            name = path.relative_to(root).as_posix()
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
                all_digests[name] = digests.get(name) or _sha256_of_file(path, handle)
            sizes[name] = path.stat().st_size
    return sizes, all_digests


class _HashingWriter:
    """A binary file that hashes what is written to it (``torch.save`` writes through ``write``)."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest = handle, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _safetensors_digest(path: Path, tensors: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the safetensors file ``path`` just written from ``tensors``, from its header (read back: a
    few KB) and the tensors' own bytes in memory, which the format lays out in offset order after the header. None
    when the file is not laid out so (then it is read)."""
    import torch

    with open(path, "rb") as handle:
        header_size_bytes = handle.read(8)
        header_bytes = handle.read(int.from_bytes(header_size_bytes, "little"))
    header = json.loads(header_bytes)
    entries = sorted((tuple(v["data_offsets"]), k) for k, v in header.items() if k != "__metadata__")
    digest = hashlib.sha256(header_size_bytes + header_bytes)
    position = 0
    for (start, end), name in entries:
        tensor = tensors.get(name)
        if start != position or tensor is None or tensor.numel() * tensor.element_size() != end - start:
            return None
        data = tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8)
        digest.update(data.numpy())
        position = end
    if 8 + len(header_bytes) + position != path.stat().st_size or sys.byteorder != "little":
        return None
    return digest.hexdigest()


@contextlib.contextmanager
def _digests_while_writing(root: Path, digests: dict[str, str]) -> Iterator[None]:
    """Within the block, the files accelerate writes through ``accelerate.checkpointing.save`` (the model, optimizer
    and scheduler states) under ``root`` get their SHA-256 in ``digests`` as they are written: the same files,
    written the same way (safetensors or ``torch.save``), by the same process."""
    import accelerate.checkpointing as checkpointing
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = checkpointing.save

    def save(obj: Any, f: Any, save_on_each_node: bool = False, safe_serialization: bool = False) -> None:
        import torch
        from safetensors.torch import save_file

        state = PartialState()
        if state.distributed_type == DistributedType.XLA or not isinstance(f, (str, os.PathLike)):
            return original(obj, f, save_on_each_node=save_on_each_node, safe_serialization=safe_serialization)
        if not ((state.is_main_process and not save_on_each_node) or
                (state.is_local_main_process and save_on_each_node)):
            return None
        path = Path(f)
        name = path.resolve().relative_to(root.resolve()).as_posix()
        if safe_serialization:
            from accelerate.utils import clean_state_dict_for_safetensors

            if isinstance(obj, OrderedDict):
                obj = clean_state_dict_for_safetensors(obj)
            save_file(obj, path, metadata={"format": "pt"})
            digest = _safetensors_digest(path, obj)
        else:
            with open(path, "wb") as handle:
                writer = _HashingWriter(handle)
                torch.save(obj, writer)
            digest = writer.digest.hexdigest()
        if digest is not None:
            digests[name] = digest
        return None

    checkpointing.save = save
    try:
        yield
    finally:
        checkpointing.save = original


def verify_digests(path: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Read every file of the checkpoint ``path`` and compare its SHA-256 with the manifest's (checkpoints written
    before digests were recorded have none: nothing to compare); :class:`CheckpointError` naming a file that
    differs."""
    path = Path(path)
    for name, expected in manifest.get("sha256", {}).items():
        if _sha256_of_file(path / name) != expected:
            raise CheckpointError(
                f"Refusing to load {path}: the contents of {name} differ from what was written there (SHA-256 "
                "recorded in its manifest): it was replaced or damaged after the save, e.g. swapped with another "
                "checkpoint's file; nothing in it was executed. Resume from another checkpoint (give its step_<N> "
                "folder).")


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or its cause) says that the disk or the quota is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left" in text or "file write failed" in text or "Disk quota" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def write_failure(error: BaseException, output_dir: Path, what: str) -> str:
    """What went wrong writing ``what`` into ``output_dir``, as the first sentence of an error: a full disk or quota
    with the space left, or the error itself."""
    if is_disk_full(error):
        free = shutil.disk_usage(output_dir).free
        return f"No space left on the device of {output_dir} ({free / 2**20:.1f} MiB free) while writing {what}"
    return f"Could not write {what} into {output_dir}: {error!r}"


def _write_error(error: BaseException, output_dir: Path, path: Path) -> CheckpointError:
    advice = (" Free some space (or lower --checkpoints_total_limit) and resume with --resume_from_checkpoint latest."
              if is_disk_full(error) else "")
    return CheckpointError(f"{write_failure(error, output_dir, f'checkpoint {path.name}')}; it was discarded and the "
                           f"earlier checkpoints are intact.{advice}")


def save_checkpoint(accelerator: Any, output_dir: str | os.PathLike, step: int, run_id: str,
                    state: Mapping[str, Any], total_limit: int | None = None) -> Path:
    """Save ``accelerator.save_state`` plus the loop's JSON ``state`` as ``output_dir/step_<step>``, atomically.

    Every rank must call it. A failure (e.g. a full disk) discards the partial folder and raises
    :class:`CheckpointError` in plain words; earlier checkpoints are untouched. With ``total_limit`` the oldest
    complete checkpoints of this run beyond the limit are removed afterwards (the new one is always kept).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"step_{step}"
    temporary = output_dir / f".step_{step}.incomplete"
    failure: BaseException | None = None
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    digests: dict[str, str] = {}
    try:
        with _digests_while_writing(temporary, digests):
            accelerator.save_state(str(temporary))  # every rank writes its part (RNG states, shards)
    except Exception as error:  # noqa: BLE001 - translated below, after the other ranks are done
        failure = error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            if failure is not None:
                raise failure
            files, sha256 = _fsync_tree(temporary, digests)
            manifest = {"format": MANIFEST_FORMAT, "run_id": run_id, "step": int(step),
                        "saved": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files, "sha256": sha256,
                        "state": dict(state)}
            _write_json_atomic(temporary / MANIFEST_NAME, manifest)
            if final.exists():  # another run's step_<N> (--overwrite_output_dir): replace it
                trash = output_dir / f".step_{step}.replaced"
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(temporary, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(temporary, final)
            _fsync_dir(output_dir)
        except Exception as error:  # noqa: BLE001
            shutil.rmtree(temporary, ignore_errors=True)
            failure = error
    # Every rank learns whether the save worked, so that none trains on while another stopped.
    from accelerate.utils import gather_object

    ok = gather_object([failure is None])
    if not all(ok):
        if failure is not None:
            raise _write_error(failure, output_dir, final) from failure
        raise CheckpointError(f"checkpoint {final.name} failed on another process (see its log)")
    logger.info("Saved checkpoint %s", final)
    if accelerator.is_main_process and total_limit:
        prune_checkpoints(output_dir, run_id, total_limit, newest=final)
    return final


def prune_checkpoints(output_dir: str | os.PathLike, run_id: str, keep: int, newest: str | os.PathLike | None = None
                      ) -> list[Path]:
    """Remove the oldest complete checkpoints of run ``run_id`` beyond the newest ``keep`` (``keep >= 1``).

    ``newest``: the checkpoint just written, which is kept whatever its step number (the others kept are the
    highest steps). Other runs' checkpoints and incomplete folders are never touched. Returns the removed paths.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    newest = None if newest is None else Path(newest).resolve()
    mine = [info for info in list_checkpoints(output_dir) if info.complete and info.run_id == run_id]
    if newest is not None:
        mine = [info for info in mine if info.path.resolve() != newest]
        keep -= 1
    removed = []
    for info in mine[:len(mine) - keep]:
        shutil.rmtree(info.path, ignore_errors=True)
        removed.append(info.path)
        logger.info("Removed checkpoint %s (--checkpoints_total_limit %d)", info.path, keep)
    return removed


# Plain-data classes DeepSpeed pickles into its checkpoints (an enum, a loss-scale holder, a dataclass of two
# ints); allowed when checking DeepSpeed's files with weights_only=True.
_DEEPSPEED_PLAIN_DATA = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def _check_plain_data(file: Path) -> None:
    """Read ``file`` with ``torch.load(weights_only=True)`` (memory-mapped: nothing is kept), allowing DeepSpeed's
    plain-data classes; raises ``pickle.UnpicklingError`` when it holds anything else. A file that passes makes a
    later ``weights_only=False`` load of the same bytes run the same, allowed, constructors only."""
    import importlib

    import torch

    allowed = []
    for module, name in _DEEPSPEED_PLAIN_DATA:
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # no DeepSpeed (or another version): nothing more is allowed
            continue
    with torch.serialization.safe_globals(allowed):
        try:
            torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # not a zip-format file: mmap is impossible, read it plainly
            if "mmap" not in str(error):
                raise
            torch.load(file, map_location="cpu", weights_only=True)


def load_checkpoint(accelerator: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Restore model, optimizer, scaler and RNG states from a complete checkpoint (every rank) and return its
    manifest (with the loop's JSON ``state``).

    Raises:
        CheckpointError: incomplete, or a file that is not plain tensor data (``weights_only=True`` refused it:
            the checkpoint was tampered with or is not from ijepa_hf).
    """
    import pickle

    from accelerate.utils import load as safe_load

    from .distributed import run_on_main_process

    path = Path(path)
    manifest = read_manifest(path)
    # One process reads the files for their digests; every process learns the outcome.
    run_on_main_process(accelerator, lambda: verify_digests(path, manifest))
    listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
    extra = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()
                   and p.relative_to(path).as_posix() not in listed)
    if extra:
        raise CheckpointError(f"Refusing to load {path}: it holds files its manifest does not list ({', '.join(extra)}), "
                              "so it was changed after it was written; nothing in it was executed.")
    try:
        # accelerate ignores an unreadable RNG-state file (it logs and goes on): check those first, the same way
        # it reads them (weights_only=True plus numpy's array types), so that a tampered one is refused too.
        for rng_file in sorted(path.glob("random_states_*.pkl")):
            safe_load(rng_file)
        # DeepSpeed reads its own files with weights_only=False: check them with weights_only=True first.
        for engine_file in sorted(path.glob("*/*.pt")):
            _check_plain_data(engine_file)
        accelerator.load_state(str(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"Refusing to load {path}: one of its files holds more than tensors and numbers (torch.load with "
            f"weights_only=True refused it: {str(error).splitlines()[0]}). It may have been tampered with; "
            "nothing in it was executed."
        ) from error
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(
            f"Could not load {path}: {error}. Its files are read with weights_only=True: nothing in it was executed."
        ) from error
    return manifest

"""How the example scripts (``examples/*.py``) start and end: their logging and how they report a user's error.

* :func:`configure_logging`: the transformers example scripts' log format at INFO for the package, with the HTTP
  clients' request lines (one per Hub request) kept at WARNING.
* :func:`run_script`: runs a script's ``main(argv)``; an error the user can fix (a bad argument, a missing file, a
  folder in use, a refused resume, a full disk, a failed push) is printed as one line naming the script, and the
  script exits with code 2; Ctrl-C is one line too (exit code 130). ``--debug`` on the command line, or
  ``IJEPA_HF_DEBUG=1``, shows the full traceback. Anything else (a bug) keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEBUG_FLAG", "DEBUG_ENV", "INTERRUPTED_EXIT_CODE", "TRAINING_INTERRUPTED", "USAGE_EXIT_CODE",
           "check_trainer_length", "configure_logging", "quiet_http_logging", "prepare_trainer_run",
           "resolve_device", "resolve_resume_checkpoint", "run_script", "trainer_run_folder", "user_errors"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "IJEPA_HF_DEBUG"
USAGE_EXIT_CODE = 2  # argparse's, for the same kind of mistake
INTERRUPTED_EXIT_CODE = 130  # the shell's for a process ended by Ctrl-C (128 + SIGINT)
# What a training script's user can do after Ctrl-C (run_script's on_interrupt)
TRAINING_INTERRUPTED = ("the checkpoints saved so far are kept: --resume_from_checkpoint latest continues from the "
                        "last one (to stop with a checkpoint of the current update instead, send SIGTERM)")
# Loggers that log every HTTP request at INFO (huggingface_hub's clients).
_HTTP_LOGGERS = ("httpx", "httpx2", "httpcore", "urllib3")


def configure_logging(level: int = logging.INFO) -> None:
    """The examples' log format at ``level``; HTTP request lines only from WARNING on."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        level=level)
    quiet_http_logging()


def quiet_http_logging() -> None:
    """Log the HTTP clients' per-request lines only from WARNING on (for scripts with their own log set-up)."""
    for name in _HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions whose message is the whole story for a user: wrong arguments or data, files and folders, the
    Hub, and this package's own run errors (each names the problem and the fix)."""
    from .training.checkpointing import CheckpointError, OutputDirInUseError
    from .training.export import ExportError, HubPushError
    from .training.step import NonFiniteLossError

    return (ValueError, OSError, CheckpointError, OutputDirInUseError, ExportError, HubPushError, NonFiniteLossError)


def check_trainer_length(training_args: Any) -> None:
    """Refuse (``ValueError``) a Trainer script's run length that trains nothing: ``TrainingArguments`` takes
    ``--max_steps 0`` as "count epochs" and ``--num_train_epochs 0`` as an empty run, and the run exits 0."""
    if training_args.max_steps == 0:
        raise ValueError("--max_steps 0 trains nothing: give a positive number of steps, or -1 (the default) to train "
                         "--num_train_epochs")
    if training_args.max_steps < 0 and training_args.num_train_epochs <= 0:
        raise ValueError(f"--num_train_epochs {training_args.num_train_epochs:g} trains nothing: give a positive "
                         "number of epochs, or --max_steps")


def resolve_device(value: str | None) -> str:
    """The device of a script's ``--device`` (``None``: cuda when available, else cpu), refused (``ValueError``
    naming the flag) where this machine cannot use it: torch would stop at the first tensor moved there, after the
    data and the model were read, with a traceback such as "Torch not compiled with CUDA enabled"."""
    import torch

    if value is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise ValueError(f"--device {value!r} is not a torch device ({error}): give cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return value
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    name = device.type.upper() if device.type in ("cuda", "xpu") else device.type
    if backend is None or not backend.is_available():
        raise ValueError(f"--device {value}: this torch sees no {name} GPU (torch.{device.type}.is_available() is "
                         "False); give --device cpu, or leave --device out (the GPU when there is one, else the CPU)")
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {value}: this machine has {count} {name} GPU{'' if count == 1 else 's'} "
                         f"({device.type}:0 to {device.type}:{count - 1})")
    return value


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """A Trainer script's ``--resume_from_checkpoint``: ``"latest"`` (as in ``pretrain.py``) is the newest complete
    ``checkpoint-*`` in ``output_dir`` (folders a kill cut short are skipped, naming them), or ``None`` (a fresh
    start) when there is none; ``"last"`` is a deprecated alias; anything else is a checkpoint path, refused when it
    was cut short."""
    from .training.checkpointing import resolve_trainer_checkpoint

    return resolve_trainer_checkpoint(_resume_keyword(value), output_dir)


def _resume_keyword(value: str | None) -> str | None:
    """``--resume_from_checkpoint`` with the deprecated ``last`` read as ``latest``, with a warning."""
    if value != "last":
        return value
    import warnings

    warnings.warn("--resume_from_checkpoint last is deprecated: use `latest` (the pretraining script's keyword).",
                  FutureWarning, stacklevel=3)
    return "latest"


def prepare_trainer_run(training_args: Any, overwrite_output_dir: bool,
                        check_resume: Callable[[Path], None] | None = None) -> str | None:
    """A Trainer script's output folder and the checkpoint it resumes: ``--resume_from_checkpoint`` (see
    :func:`resolve_resume_checkpoint`) under the output-folder policy of
    :func:`~ijepa_hf.training.checkpointing.prepare_trainer_output_dir`, applied by the main process first (the
    others then find the folder as it left it). ``check_resume(checkpoint)`` refuses a checkpoint the run cannot
    continue, before anything in the folder moves."""
    from .training.checkpointing import prepare_trainer_output_dir

    value = _resume_keyword(training_args.resume_from_checkpoint)
    with training_args.main_process_first(local=False, desc="the output folder"):
        return prepare_trainer_output_dir(training_args.output_dir, resume_from_checkpoint=value,
                                          overwrite_output_dir=overwrite_output_dir, check_resume=check_resume)


@contextlib.contextmanager
def trainer_run_folder(training_args: Any, overwrite_output_dir: bool,
                       check_resume: Callable[[Path], None] | None = None) -> Iterator[str | None]:
    """:func:`prepare_trainer_run` with the folder's run lock held by the main process for the length of the
    ``with`` block (:class:`~ijepa_hf.training.checkpointing.OutputDirLock`, as ``pretrain.py``): a second run into
    the folder fails at once, naming the holder. Yields the checkpoint to resume."""
    from .training.checkpointing import OutputDirLock

    held = OutputDirLock(training_args.output_dir).acquire() if training_args.process_index == 0 else None
    try:
        yield prepare_trainer_run(training_args, overwrite_output_dir, check_resume)
    finally:
        if held is not None:
            held.release()


def run_script(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None, *,
               on_interrupt: str | None = None) -> Any:
    """Run ``main(argv)`` (``argv`` without ``--debug``; default ``sys.argv[1:]``) and return what it returns; a
    user's error is printed as one line and exits with :data:`USAGE_EXIT_CODE` (see the module docstring); Ctrl-C
    (``KeyboardInterrupt``) is one line too, with ``on_interrupt`` (what the user can do next) after it, and exits
    with :data:`INTERRUPTED_EXIT_CODE`. A process
    group the run started (``accelerate launch``) is ended on the way out: after a run that finished, once every
    process has reached that point (a process that closed its connections while another was still in a collective
    aborted that one, gloo's ``terminate called without an active exception``, and the launcher reported the whole
    job failed); after an error, at once."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [item for item in argv if item != DEBUG_FLAG]
    finished = False
    try:
        result = main(argv)
        finished = True
        return result
    except user_errors() as error:
        if debug:
            raise
        message = str(error).strip() or type(error).__name__
        print(f"{Path(sys.argv[0]).name}: error: {message} (the traceback: add {DEBUG_FLAG} or set {DEBUG_ENV}=1)",
              file=sys.stderr)
        raise SystemExit(USAGE_EXIT_CODE) from None
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{Path(sys.argv[0]).name}: interrupted (Ctrl-C)" + (f": {on_interrupt}" if on_interrupt else ""),
              file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT_CODE) from None
    finally:
        _end_process_group(wait_for_everyone=finished)


def _end_process_group(wait_for_everyone: bool) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_everyone and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()

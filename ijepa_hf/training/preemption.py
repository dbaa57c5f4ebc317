"""Pre-emption: a signal asks a run to stop, and it stops at the end of its current update with a checkpoint.

A cluster ends a job with a signal and a grace period before ``SIGKILL``: SLURM sends ``SIGTERM`` at pre-emption
and at the time limit (``--signal=...`` an earlier one of your choice, e.g. ``SIGUSR1``), Kubernetes ``SIGTERM``.
:class:`PreemptionHandler` turns those signals into a request: the handler only records it; the training loop asks
:meth:`PreemptionHandler.stop_requested` after every update — all processes agree, so they stop after the same
update — then writes a complete checkpoint, releases its folder and raises :class:`TrainingPreempted`, which
``examples/pretrain.py`` turns into exit code :data:`PREEMPTED_EXIT_CODE`. ``--resume_from_checkpoint latest``
continues from that update: nothing is redone.

Further signals while it stops are logged and ignored: the save is finished rather than cut short (a save cut
short by ``SIGKILL`` leaves the previous complete checkpoint, as checkpoints are published by a rename). DataLoader
workers ignore these signals (:func:`ignore_signals`): the training process shuts them down itself.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from datetime import timedelta
from types import FrameType
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["PREEMPTED_EXIT_CODE", "DEFAULT_PREEMPTION_SIGNALS", "TrainingPreempted", "PreemptionHandler",
           "parse_signals", "ignore_signals"]

# sysexits.h's EX_TEMPFAIL: "a temporary failure; the user is invited to retry" — here, to resume.
PREEMPTED_EXIT_CODE = 75
DEFAULT_PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainingPreempted(RuntimeError):
    """Raised by ``pretrain()`` after a pre-emption signal: the run stopped after update ``step`` with the complete
    checkpoint ``checkpoint``; continue it with ``--resume_from_checkpoint latest``."""

    def __init__(self, step: int, checkpoint: str, signal_name: str) -> None:
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        super().__init__(f"{signal_name} received: stopped after step {step} with the complete checkpoint "
                         f"{checkpoint}; continue with --resume_from_checkpoint latest")


def parse_signals(text: str | Sequence[str] | None) -> tuple[signal.Signals, ...]:
    """``"SIGTERM,SIGUSR1"`` (or ``TERM``, or ``"none"`` / empty for none) -> the signals; an unknown or
    uncatchable name is an error naming it."""
    if text is None:
        return ()
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    if [name.lower() for name in names] in ([], ["none"]):
        return ()
    found = []
    for name in names:
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        value = getattr(signal.Signals, full, None)
        if value is None or value in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"--preemption_signals: {name!r} is not a signal a process can catch; give names such "
                             f"as {','.join(DEFAULT_PREEMPTION_SIGNALS)}, or 'none'")
        found.append(value)
    return tuple(dict.fromkeys(found))


def ignore_signals(signals: Sequence[int], *_: Any) -> None:
    """For a DataLoader's ``worker_init_fn`` (``functools.partial(ignore_signals, signals)``): the workers ignore
    the pre-emption signals that their process group receives; the training process stops them."""
    for value in signals:
        signal.signal(value, signal.SIG_IGN)


class PreemptionHandler:
    """Records the first of ``signals`` received (a context manager that installs and restores the handlers).

    Args:
        signals: what to catch (:func:`parse_signals`); empty: nothing is installed and no stop is ever requested.
        group: a ``torch.distributed`` process group on the host (gloo) for :meth:`stop_requested` to agree in, or
            ``None`` in a single process. Agreeing costs one tiny host-side all-reduce per update, never a wait for
            the accelerator.
    """

    @classmethod
    def for_this_process(cls, signals: Sequence[int], timeout_seconds: float) -> PreemptionHandler:
        """A handler whose :meth:`stop_requested` agrees with the other processes of the run, if there are any: over
        a gloo group (on the host) with ``timeout_seconds`` for a process that stopped answering. Every process must
        call it (creating the group is a collective)."""
        import torch.distributed as dist

        group = None
        if signals and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_seconds))
        return cls(signals, group)

    def __init__(self, signals: Sequence[int] = (), group: Any = None) -> None:
        self.signals = tuple(signal.Signals(value) for value in signals)
        self.group = group
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> PreemptionHandler:
        if self.signals and threading.current_thread() is not threading.main_thread():
            logger.warning("Pre-emption signals are not handled: pretrain() runs outside the main thread, where "
                           "Python cannot install signal handlers")
            return self
        for value in self.signals:
            self._previous[value] = signal.signal(value, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for value, previous in self._previous.items():
            signal.signal(value, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signal.Signals(signum)
            logger.warning("%s received: finishing this update, then saving a checkpoint and stopping", name)
        else:
            logger.warning("%s received again: still saving the checkpoint (a kill now leaves the previous one)",
                           name)

    def stop_requested(self) -> bool:
        """Whether any process received one of the signals (every process must call it, after the same update)."""
        if self.group is None:
            return self.received is not None
        flag = torch.tensor([0 if self.received is None else int(self.received)], dtype=torch.int64)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        value = int(flag[0])
        if value and self.received is None:
            self.received = signal.Signals(value)  # another process received it
        return bool(value)

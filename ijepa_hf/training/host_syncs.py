"""Counting the places where the host waits for the device.

A training step that reads a device value on the host (``loss.item()``, ``if torch.isnan(loss)``, a
data-dependent shape) makes the host wait until every kernel queued before it has run: the host can no longer
prepare the next step while the device works, and both take turns instead of overlapping. The loop reads device
values only at its own cadences (log rows, checkpoints, epoch ends); :class:`HostSyncCounter` is how that is
checked.

On CUDA it counts CUDA's own report of synchronising calls (``torch.cuda.set_sync_debug_mode``), which also sees
the ones made inside operators' host code; on another accelerator, the reading operations applied to its tensors.
On the CPU nothing waits, so it counts what *would* wait: the reading operations called from outside torch and
outside this package's host-side data pipeline (whose tensors stay on the host), whichever tensor they read. Compare two runs
that differ only in their number of steps: a count that grows with the steps is a per-step sync.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncCounter"]

# Tensor operations whose result the host must have: they wait for the device.
_READS = frozenset({
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.__format__,
    torch.Tensor.nonzero, torch.nonzero,
})
_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # ijepa_hf/
# Host-side parts of the package: they read host tensors by design (and run in DataLoader workers on a GPU run).
_HOST_SIDE = (os.path.join(_PACKAGE, "data") + os.sep, os.path.join(_PACKAGE, "masking.py"))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


class HostSyncCounter(TorchFunctionMode):
    """A context manager that counts host syncs (see the module docstring) in the current thread.

    Args:
        device: the device the training runs on. ``"cuda"``: CUDA's own sync warnings; another accelerator: reads
            of its tensors; ``"cpu"``: reads called from the training code.

    Attributes:
        count: syncs counted so far; ``sites``: a ``Counter`` of ``"file:line function"`` where they were made
            (the first frame outside torch), to find them.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.count = 0
        self.sites: Counter[str] = Counter()
        self._warnings: Any = None
        self._previous_debug_mode: int | None = None

    # ---- the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _READS:
            site = self._caller()
            if self._counts(func, args, site):
                self._record(site)
        return func(*args, **(kwargs or {}))

    def _counts(self, func: Any, args: tuple, site: str) -> bool:
        if self.device.type == "cuda":  # CUDA's own report sees these and more (__exit__)
            return False
        if self.device.type != "cpu":
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            return tensor is not None and tensor.device.type == self.device.type
        if func is torch.Tensor.cpu:  # a no-op on the CPU, a copy to the host elsewhere
            return False
        return not site.startswith(_HOST_SIDE)

    @staticmethod
    def _caller() -> str:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(_TORCH)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        if frame is None:
            return "?"
        return f"{os.path.abspath(frame.f_code.co_filename)}:{frame.f_lineno} {frame.f_code.co_name}"

    def _record(self, site: str) -> None:
        self.count += 1
        self.sites[site] += 1

    # ---- CUDA's own report
    def __enter__(self) -> HostSyncCounter:
        if self.device.type == "cuda":
            self._previous_debug_mode = torch.cuda.get_sync_debug_mode()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(self._previous_debug_mode)
            for caught in self._caught:
                if "synchronizing" in str(caught.message):
                    self._record(f"{caught.filename}:{caught.lineno} (CUDA sync warning)")
            self._warnings.__exit__(*exc)
            self._warnings = None

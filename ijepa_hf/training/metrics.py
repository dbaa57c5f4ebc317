"""Training metrics: the ``train_log.jsonl`` schema, representation-collapse statistics and the log window.

One row of ``train_log.jsonl`` is written every ``logging_steps`` optimizer updates; its keys are the constants
below, which :mod:`ijepa_hf.visualization` reads too. The collapse statistics of a row are those of the last batch
before it, from tensors the forward pass made anyway.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "TRAIN_LOG_NAME",
    "LOSS_KEY",
    "SCHEDULE_KEYS",
    "COLLAPSE_KEYS",
    "THROUGHPUT_KEY",
    "LOADER_KEYS",
    "LOG_KEYS",
    "ONLINE_PROBE_KEYS",
    "HELD_OUT_KEYS",
    "collapse_inputs",
    "collapse_signals",
    "collapse_statistics",
    "effective_rank",
    "online_probe",
    "DEFAULT_ONLINE_PROBE_IMAGES",
    "default_online_probe_steps",
    "CollapseMonitor",
    "LogWindow",
    "REGULARIZER_KEYS",
    "read_train_log",
    "throughput_summary",
    "truncate_train_log",
    "write_train_log",
    "append_train_log",
]

TRAIN_LOG_NAME = "train_log.jsonl"
# The keys of a log row (``step`` and ``epoch`` first). Values that could not be computed are JSON null.
LOSS_KEY = "loss"
SCHEDULE_KEYS = ("lr", "weight_decay", "momentum")
# target_std: std over the batch of the pooled target features; target_token_std / pred_std: std over all target
# tokens of the targets / predictions; target_rankme: effective rank (RankMe) of the pooled target features;
# target_cosine: mean pairwise cosine similarity of the pooled target features of different images.
COLLAPSE_KEYS = ("target_std", "target_token_std", "pred_std", "target_rankme", "target_cosine")
# The anti-collapse regulariser's terms (unweighted), in rows of runs whose config turns one on: prediction_loss is
# the prediction term of loss alone, the others are the terms IJepaForPreTraining adds to it, each times its weight.
REGULARIZER_KEYS = ("prediction_loss", "sigreg_loss", "variance_loss", "covariance_loss")
THROUGHPUT_KEY = "images_per_s"


def regularizer_vector(terms: Mapping[str, Any]) -> torch.Tensor:
    """The regulariser's terms in `REGULARIZER_KEYS` order as one detached float32 device vector, NaN for a term
    that is off (absent or ``None``), so that windows of them can be summed and reduced in one collective."""
    present = next(terms[k] for k in REGULARIZER_KEYS if terms.get(k) is not None)
    return torch.stack([terms[k].detach().float() if terms.get(k) is not None
                        else present.new_tensor(float("nan"), dtype=torch.float32) for k in REGULARIZER_KEYS])
# What limits the throughput: data_wait_fraction is the share of the row's wall time the loop waited for its next
# batch (near 0: the step limits; near 1: the data); loader_images_per_s is what the loader can deliver (images per
# second of a worker's making time, times the workers, summed over processes), to set beside images_per_s.
LOADER_KEYS = ("data_wait_fraction", "loader_images_per_s")
# online_knn_accuracy: k-NN accuracy of the target encoder's pooled features on the run's online probe set (a
# bank and held-out queries of labelled images); online_rankme: RankMe of those features over the whole probe set;
# online_probe_seconds: what the probe cost (in rows that have one); online_knn_pixels_accuracy: the same k-NN on the
# probe set's raw pixels, the reference the encoder's accuracy is read against (constant over a run).
ONLINE_PROBE_KEYS = ("online_knn_accuracy", "online_rankme", "online_probe_seconds", "online_knn_pixels_accuracy")
# eval_loss: the loss the run minimises, on held-out images (``--eval_steps`` / ``--validation_*``; the same crops and
# masks at every evaluation); eval_seconds: what the evaluation cost (in rows that have one).
HELD_OUT_KEYS = ("eval_loss", "eval_seconds")
# The raw-pixel reference of a probe set, computed once per (pixel tensor, k): id(tensor) -> (a weak reference to
# it, {k: accuracy}); tensors compare elementwise, so they cannot be dictionary keys themselves.
_PIXEL_REFERENCE: dict[int, tuple[weakref.ref, dict[int, float]]] = {}
LOG_KEYS = ("step", "epoch", LOSS_KEY, *SCHEDULE_KEYS, THROUGHPUT_KEY, *LOADER_KEYS, *COLLAPSE_KEYS, "context_patches",
            "target_patches", "skipped_batches", *REGULARIZER_KEYS)


def effective_rank(features: torch.Tensor) -> float:
    """RankMe (Garrido et al., 2023): ``exp`` of the entropy of the normalised singular values of ``features``
    ``[N, D]``. Between 1 (all rows on one line) and ``min(N, D)``; ``nan`` for fewer than 2 rows or non-finite
    features."""
    if features.shape[0] < 2:
        return float("nan")
    if not bool(torch.isfinite(features).all()):  # the SVD would fail; the loop names the non-finite step itself
        return float("nan")
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum().clamp_min(1e-12) + 1e-7
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def collapse_inputs(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """What the collapse signals need of one forward pass (an ``IJepaForPreTraining``-style output with
    ``target_hidden_state [B, N, D]``, ``targets [..., D]`` and ``predictions [..., D]``), detached on its device
    and with no host sync, so that it can be kept at every update: the pooled target features ``[B, D]`` (each
    token layer-normalised, then averaged) and the std over all tokens of the targets and of the predictions
    ``[2]`` (NaN for a single token)."""
    hidden = output.target_hidden_state.float()
    pooled = F.layer_norm(hidden, hidden.shape[-1:]).mean(1)
    stds = [tokens.float().flatten(0, -2).std(0).mean() if tokens[..., 0].numel() > 1
            else hidden.new_tensor(float("nan")) for tokens in (output.targets, output.predictions)]
    return pooled, torch.stack(stds)


def collapse_signals(pooled: torch.Tensor, token_stds: torch.Tensor) -> torch.Tensor:
    """The collapse signals (`COLLAPSE_KEYS` order, float32 on the device of ``pooled``) of :func:`collapse_inputs`.

    The std alone is fooled by scale: features that all point the same way with a little noise keep a std above
    any fixed threshold. The pairwise cosine and the effective rank of the pooled features are scale-free. The
    rank's SVD syncs with the host: call it when a row is written, not at every update.
    """
    nan = pooled.new_tensor(float("nan"))
    batch = pooled.shape[0]
    if batch > 1:
        unit = F.normalize(pooled, dim=-1)
        similarity = unit @ unit.T
        cosine = (similarity.sum() - similarity.diagonal().sum()) / (batch * (batch - 1))
    else:
        cosine = nan
    return torch.stack([pooled.std(0).mean() if batch > 1 else nan, token_stds[0], token_stds[1],
                        pooled.new_tensor(effective_rank(pooled)), cosine]).float()


def collapse_statistics(output: Any) -> dict[str, float]:
    """Representation-collapse signals of one forward pass (`COLLAPSE_KEYS`; see :func:`collapse_inputs` for what
    ``output`` holds): :func:`collapse_signals` of :func:`collapse_inputs`, read on the host."""
    return dict(zip(COLLAPSE_KEYS, collapse_signals(*collapse_inputs(output)).tolist()))


# Images of the online probe set by default (half bank, half queries). Each probe is one forward pass of them, about
# 10 times a run: a few percent of the main job's training time (benchmarks/README.md, "Online learning telemetry:
# what it costs").
DEFAULT_ONLINE_PROBE_IMAGES = 512


def default_online_probe_steps(total_steps: int, logging_steps: int = 1) -> int:
    """The default cadence of the online probe: about 10 times per run, on a multiple of ``logging_steps`` (so that
    the probes fall on log rows and the log keeps its cadence)."""
    logging_steps = max(1, int(logging_steps))
    return logging_steps * max(1, total_steps // 10 // logging_steps)


@torch.no_grad()
def online_probe(
    encoder: torch.nn.Module,
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    k: int = 20,
    batch_size: int = 256,
    autocast: Any = None,
) -> dict[str, float]:
    """The online learning signals of a run: k-NN accuracy and RankMe of ``encoder``'s pooled features.

    Args:
        encoder: the target encoder (an ``IJepaEncoderModel``: ``pooler_output [B, D]`` is the average-pooled
            patch features that downstream probes use); put back in its training mode afterwards.
        pixel_values: ``[N, C, H, W]`` on any device (moved to the encoder's in batches).
        labels: ``[N]``; the first ``N // 2`` images are the k-NN bank, the rest its queries.
        k: neighbours of the cosine k-NN (``ijepa_hf.evaluation.knn_probe``).
        autocast: a context-manager factory for the forward (the run's precision), or None.

    Returns:
        ``{"online_knn_accuracy", "online_rankme", "online_probe_seconds", "online_knn_pixels_accuracy"}``: the
        last is the same k-NN on the raw pixels of the same images (computed at the first call for these pixels),
        the floor an encoder worth its training clears.
    """
    from ..evaluation import knn_probe

    start = time.perf_counter()
    device = next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    features = []
    try:
        for chunk in pixel_values.split(batch_size):
            context = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
            with context:
                features.append(encoder(pixel_values=chunk.to(device)).pooler_output.float().cpu())
    finally:
        encoder.train(was_training)
    features = torch.cat(features)
    bank = len(features) // 2
    knn = knn_probe(features[:bank], labels[:bank], features[bank:], labels[bank:], k=min(k, bank))
    held = _PIXEL_REFERENCE.get(id(pixel_values))
    if held is None or held[0]() is not pixel_values:
        key = id(pixel_values)
        held = _PIXEL_REFERENCE[key] = (weakref.ref(pixel_values, lambda _: _PIXEL_REFERENCE.pop(key, None)), {})
    reference = held[1]
    if k not in reference:
        pixels = pixel_values.detach().flatten(1).float().cpu()
        reference[k] = float(knn_probe(pixels[:bank], labels[:bank], pixels[bank:], labels[bank:],
                                       k=min(k, bank))["accuracy"])
    return {"online_knn_accuracy": float(knn["accuracy"]), "online_rankme": effective_rank(features),
            "online_probe_seconds": time.perf_counter() - start, "online_knn_pixels_accuracy": reference[k]}


class CollapseMonitor:
    """Warns once when a logged row shows representation collapse.

    Collapse is declared when the pooled target features of different images are nearly parallel
    (``target_cosine > max_cosine``) — a test the scale of the features cannot fool — or when their std falls below
    ``min_std``. Rows without statistics (``nan``) are skipped. The effective rank (``target_rankme``) is logged and
    drawn, not warned on: with the small batches of a log step its range is too narrow for a fixed threshold.
    """

    def __init__(self, min_std: float = 0.01, max_cosine: float = 0.999) -> None:
        # Named as the options that set them (pretrain.py and pretrain_trainer.py, IJepaTrainer's keywords)
        if not (math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"collapse_threshold must be a finite number >= 0 (0: no warning on the std), got "
                             f"{min_std}")
        if not (math.isfinite(max_cosine) and -1 <= max_cosine <= 1):
            raise ValueError(f"collapse_max_cosine must be a number in [-1, 1] (1: no warning on the cosine), got "
                             f"{max_cosine}")
        self.min_std, self.max_cosine = float(min_std), float(max_cosine)
        self.warned_at: int | None = None

    def reasons(self, row: Mapping[str, Any]) -> list[str]:
        """The collapse criteria a row meets (empty when healthy or without statistics)."""
        def finite(key: str) -> float | None:
            value = row.get(key)
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

        found = []
        if (cosine := finite("target_cosine")) is not None and cosine > self.max_cosine:
            found.append(f"target_cosine={cosine:.5f} > {self.max_cosine} (different images get nearly parallel "
                         "features)")
        if (std := finite("target_std")) is not None and std < self.min_std:
            found.append(f"target_std={std:.2e} < {self.min_std}")
        return found

    def check(self, row: Mapping[str, Any]) -> bool:
        """Log the warning the first time a row meets a criterion; returns whether this row did."""
        found = self.reasons(row)
        if found and self.warned_at is None:
            self.warned_at = int(row.get("step", 0))
            logger.warning(
                "Possible representation collapse at step %s: %s. The target encoder maps different images to "
                "nearly the same features; consider a lower learning rate, a longer warm-up or a higher EMA "
                "momentum.", row.get("step"), "; ".join(found))
        return bool(found)


class LogWindow:
    """Accumulates micro-batch results between two log rows without a device-to-host sync per step.

    Losses are summed on the device; :meth:`flush` reduces them over ranks at the log step (the one sync the loop
    makes there anyway).
    """

    def __init__(self, device: torch.device | str = "cpu", loader_workers: int = 1) -> None:
        self.device = torch.device(device)
        self.loader_workers = max(1, int(loader_workers))
        self._time = time.perf_counter()
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_count = 0
        self.term_sums = torch.zeros(len(REGULARIZER_KEYS), dtype=torch.float64, device=self.device)
        self.term_count = 0
        self.images = self.context = self.target = self.batches = self.skipped = 0
        self.waited = self.made_seconds = 0.0
        self.made_images = 0
        self.stats: dict[str, float] | None = None

    def add_loading(self, waited: float, made_seconds: float | None, num_images: int) -> None:
        """One batch from the loader: ``waited`` seconds for it; ``made_seconds`` its worker spent making its
        ``num_images`` images (``None``: not known)."""
        self.waited += waited
        if made_seconds is not None:
            self.made_seconds += made_seconds
            self.made_images += num_images

    def add(self, loss: torch.Tensor | None, num_images: int, context_patches: int | float | torch.Tensor,
            target_patches: int, stats: dict[str, float] | None = None,
            terms: Mapping[str, torch.Tensor] | None = None) -> None:
        """``context_patches`` may be a device scalar (the mean of per-image context lengths): it is summed there
        and read at :meth:`flush`. ``terms``: the regulariser's device scalars (`REGULARIZER_KEYS`), if on."""
        if terms:
            self.term_sums += regularizer_vector(terms).to(torch.float64)
            self.term_count += 1
        self.batches += 1
        self.context += context_patches
        self.target += target_patches
        self.images += num_images
        if loss is None:
            self.skipped += 1
        else:
            self.loss_sum += loss.detach().to(torch.float64)
            self.loss_count += 1
        if stats is not None:
            self.stats = stats

    def exclude(self, seconds: float) -> None:
        """Leaves ``seconds`` of work done between two rows (the online probe) out of the row's images/s."""
        self._time += seconds

    def flush(self, accelerator: Any, **fields: Any) -> dict[str, Any] | None:
        """Reduce over ranks (every rank must call this) and return the row to log (``None`` if no rank had a good
        batch since the last row: the counts then carry over into the next row)."""
        stats = self.stats or {}
        so_far = time.perf_counter() - self._time  # the host's view; the device may still be behind it
        capacity = (self.loader_workers * self.made_images / self.made_seconds if self.made_seconds > 0
                    else float("nan"))
        values = torch.cat([torch.stack([
            self.loss_sum,
            *(torch.tensor(float(v), dtype=torch.float64, device=self.device) for v in (
                self.loss_count, self.images, self.skipped, self.waited / max(so_far, 1e-9), capacity,
                *(stats.get(k, float("nan")) for k in COLLAPSE_KEYS), self.term_count)),
        ]), self.term_sums])
        summed = accelerator.reduce(values, "sum").tolist()
        if summed[1] == 0:
            return None
        now = time.perf_counter()  # after the reduce, which waited for the device: the window's real length
        elapsed, self._time = now - self._time, now
        batches, context, target = self.batches, float(self.context), self.target
        self._reset()
        processes = accelerator.num_processes
        row = {**fields, LOSS_KEY: summed[0] / summed[1], THROUGHPUT_KEY: summed[2] / max(elapsed, 1e-9),
               "data_wait_fraction": summed[4] / processes, "loader_images_per_s": summed[5]}
        collapse_end = 6 + len(COLLAPSE_KEYS)
        row.update({k: v / processes for k, v in zip(COLLAPSE_KEYS, summed[6:collapse_end])})
        row.update(context_patches=context / max(batches, 1), target_patches=target / max(batches, 1),
                   skipped_batches=int(summed[3]))
        term_count = summed[collapse_end]
        if term_count:  # the terms a regularised run's config turns on (NaN sums: a term that is off)
            row.update({k: v / term_count for k, v in zip(REGULARIZER_KEYS, summed[collapse_end + 1:])
                        if not math.isnan(v)})
        return row


def throughput_summary(rows: list[Mapping[str, Any]], num_workers: int, on_accelerator: bool = True) -> str | None:
    """One sentence on what limited a run's throughput, from its log rows (the first, with start-up, left out when
    there are others); ``None`` without rows. ``on_accelerator``: the step runs on a GPU (or another accelerator),
    so workers decode on cores the step does not use; on the CPU they share the step's cores."""
    rows = [row for row in (rows[1:] if len(rows) > 1 else rows)
            if all(isinstance(row.get(k), (int, float)) for k in (THROUGHPUT_KEY, *LOADER_KEYS))]
    if not rows:
        return None

    def middle(key: str) -> float:
        values = sorted(float(row[key]) for row in rows)
        return values[len(values) // 2]

    speed, wait, loader = middle(THROUGHPUT_KEY), middle("data_wait_fraction"), middle("loader_images_per_s")
    text = (f"Throughput {speed:,.1f} images/s; the loop waited for data {wait:.0%} of the time; the loader can "
            f"deliver {loader:,.0f} images/s with {num_workers} worker(s)")
    if wait <= 0.1:
        return text + " — the training step limits this run."
    if on_accelerator:
        return text + " — the data limits this run: raise --num_workers (see --help)."
    return (text + " — decoding takes that share of this CPU run; --num_workers moves it to other processes, "
            "which helps only with cores the step does not use.")


def _json_row(row: Mapping[str, Any]) -> str:
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})


def append_train_log(path: str | os.PathLike, row: Mapping[str, Any]) -> None:
    """Append one row (non-finite numbers become ``null``) and flush it to disk."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(_json_row(row) + "\n")
        handle.flush()


def read_train_log(path: str | os.PathLike, skip_malformed: bool = False) -> list[dict[str, Any]]:
    """The rows of a ``train_log.jsonl``.

    A crash or a full disk can leave the *last* line cut off: it is dropped with a warning. A malformed line
    anywhere else means the file was edited or mixed up with another and raises ``ValueError`` naming it (with
    ``skip_malformed``: it is left out, to keep what can be read).
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    rows: list[dict[str, Any]] = []
    for position, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif position == len(numbered) - 1:
            logger.warning("%s: dropped its last line %d, cut off (%r): an interrupted write.", path, number,
                           line[:80])
        elif not skip_malformed:
            raise ValueError(f"{path}:{number} is not a JSON object ({line[:80]!r}); the log is corrupt — move it "
                             "away to start a new one")
    return rows


def truncate_train_log(path: str | os.PathLike, last_step: int) -> None:
    """Keep the rows up to ``last_step`` (rows after it were logged by an interrupted run and are logged again
    after the resume); a torn last line is dropped, and a log with a malformed line elsewhere is moved aside (a
    warning names it) and continued with its readable rows. Written to a temporary file and renamed."""
    path = Path(path)
    if not path.exists():
        return
    try:
        rows = read_train_log(path)
    except ValueError as error:  # an edited or mixed-up log must not block the resume of the run itself
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        rows = read_train_log(aside, skip_malformed=True)
        logger.warning("%s. The file was moved to %s; the log continues with its %d readable rows.", error, aside,
                       len(rows))
    write_train_log(path, [row for row in rows if row.get("step", 0) <= last_step])


def write_train_log(path: str | os.PathLike, rows: list[Mapping[str, Any]]) -> None:
    """Write ``rows`` as ``path`` (non-finite numbers become ``null``), through a temporary file and a rename."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(_json_row(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(temporary, path)

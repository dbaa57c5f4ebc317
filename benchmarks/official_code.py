"""The official I-JEPA training step, run from the user's own checkout of facebookresearch/ijepa.

Nothing of the official code is in this repository (it is CC BY-NC): :func:`import_official` puts the checkout the
user names (``--official-root DIR`` or ``IJEPA_OFFICIAL_ROOT``) on ``sys.path`` at run time and imports its
``src.models.vision_transformer``, ``src.masks.multiblock.MaskCollator``, ``src.masks.utils.apply_masks``,
``src.utils.tensors.repeat_interleave_batch`` and ``src.helper.init_model`` / ``init_opt`` unchanged.

:class:`OfficialCodeStep` is the body of the official ``train_step`` (``src/train.py``) around those modules: the
learning-rate and weight-decay schedulers' ``step()``, the target encoder on the full image under ``no_grad`` +
``layer_norm`` + ``apply_masks`` + ``repeat_interleave_batch``, the context encoder and the predictor, smooth-L1,
``backward``, ``torch.optim.AdamW`` with the four official groups (torch's per-parameter CPU default, as
``init_opt`` builds it), ``zero_grad`` and the Python-loop EMA. Left out, as the benchmark's issue defines the
baseline: the gradient logger (``grad_logger``), the cross-process ``AllReduce`` of the loss (one process) and the
CUDA ``GradScaler`` (``init_opt`` only builds one for bf16, and it is disabled without CUDA).

One deliberate change: the official code asks for ``torch.cuda.amp.autocast(dtype=torch.bfloat16)``, which has no
effect on CPU tensors, so on a CPU the official bf16 step would silently run in fp32. The step here enters
``torch.autocast`` for the tensors' own device instead, so that "bf16" means bf16 for both codes.
"""

from __future__ import annotations

import copy
import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

ENVIRONMENT_VARIABLE = "IJEPA_OFFICIAL_ROOT"
# The files of a facebookresearch/ijepa checkout that the step imports.
_REQUIRED = ("src/models/vision_transformer.py", "src/masks/multiblock.py", "src/masks/utils.py",
             "src/utils/tensors.py", "src/helper.py")


@dataclass(frozen=True)
class OfficialModules:
    root: Path
    revision: str
    vit: ModuleType
    helper: ModuleType
    MaskCollator: type
    apply_masks: object
    repeat_interleave_batch: object


def resolve_root(root: str | os.PathLike | None) -> Path | None:
    """The checkout named by ``root`` or, when that is None, by ``$IJEPA_OFFICIAL_ROOT``; None when neither is set.

    Raises ``FileNotFoundError`` naming the missing files when the folder is not a facebookresearch/ijepa checkout.
    """
    root = root if root is not None else os.environ.get(ENVIRONMENT_VARIABLE) or None
    if root is None:
        return None
    path = Path(root).expanduser().resolve()
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a checkout of facebookresearch/ijepa: it lacks {', '.join(missing)}. Clone it "
            "(git clone https://github.com/facebookresearch/ijepa) and pass its top folder as --official-root "
            f"(or ${ENVIRONMENT_VARIABLE}); leave both unset to compare against the rebuilt official step instead."
        )
    return path


def _revision(root: Path) -> str:
    try:
        result = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else "unknown revision"


def import_official(root: str | os.PathLike) -> OfficialModules:
    """Imports the official modules from ``root`` (see the module docstring). The checkout's top-level package is
    called ``src``, so this belongs in a process of its own (the benchmark's children) rather than in a user's
    session."""
    path = resolve_root(root)
    loaded = sys.modules.get("src")
    if loaded is not None and Path(getattr(loaded, "__path__", [""])[0]).resolve() != path / "src":
        raise RuntimeError(f"A different package called `src` is already imported ({loaded!r}); run the official "
                           "code in a fresh process.")
    sys.path.insert(0, str(path))
    # src/helper.py configures the root logger to print every model at INFO on stdout; the benchmark's children
    # answer on stdout, so that logger is kept at WARNING.
    import logging

    helper = importlib.import_module("src.helper")
    logging.getLogger().setLevel(logging.WARNING)
    return OfficialModules(
        root=path,
        revision=_revision(path),
        vit=importlib.import_module("src.models.vision_transformer"),
        helper=helper,
        MaskCollator=importlib.import_module("src.masks.multiblock").MaskCollator,
        apply_masks=importlib.import_module("src.masks.utils").apply_masks,
        repeat_interleave_batch=importlib.import_module("src.utils.tensors").repeat_interleave_batch,
    )


def official_masks(official: OfficialModules, batch_size: int, image_size: int, patch_size: int, seed: int,
                   min_keep: int = 10) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One draw of the official ``MaskCollator`` with the official I-JEPA settings (context scale 0.85-1.0, four
    target blocks of scale 0.15-0.2 and aspect 0.75-1.5, no overlap): ``(context [B, K], [M x [B, T]])``.

    The collator seeds its block sizes from a step counter and draws the positions from torch's global generator;
    both are fixed by ``seed`` here."""
    collator = official.MaskCollator(input_size=(image_size, image_size), patch_size=patch_size,
                                     enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2),
                                     aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=min_keep,
                                     allow_overlap=False)
    collator._itr_counter.value = seed - 1  # the next call's block sizes use generator seed `seed`
    torch.manual_seed(seed)
    _, masks_enc, masks_pred = collator([torch.zeros(1) for _ in range(batch_size)])
    return masks_enc[0], list(masks_pred)


class OfficialCodeStep:
    """The official models, optimizer and schedulers, as ``src.train.main`` builds them (``init_model``,
    ``copy.deepcopy`` for the target encoder, ``init_opt``), and :meth:`step`, the body of its ``train_step``."""

    def __init__(self, official: OfficialModules, model_name: str, patch_size: int, image_size: int,
                 predictor_width: int, predictor_depth: int, momentum: float = 0.996) -> None:
        self.official = official
        self.encoder, self.predictor = official.helper.init_model(
            device=torch.device("cpu"), patch_size=patch_size, model_name=model_name, crop_size=image_size,
            pred_depth=predictor_depth, pred_emb_dim=predictor_width)
        self.target_encoder = copy.deepcopy(self.encoder)
        for parameter in self.target_encoder.parameters():
            parameter.requires_grad = False
        # Official ImageNet schedule values (configs/in1k_vith14_ep300.yaml); ipe only sets the schedules' length.
        self.optimizer, _, self.scheduler, self.wd_scheduler = official.helper.init_opt(
            encoder=self.encoder, predictor=self.predictor, iterations_per_epoch=1000, start_lr=2e-4, ref_lr=1e-3,
            warmup=40, num_epochs=300, wd=0.04, final_wd=0.4, final_lr=1e-6, use_bfloat16=False, ipe_scale=1.25)
        self.momentum = momentum

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The three models in the official checkpoint's sections (what ``convert_official_checkpoint`` reads)."""
        return {"encoder": self.encoder.state_dict(), "predictor": self.predictor.state_dict(),
                "target_encoder": self.target_encoder.state_dict()}

    def loss(self, pixels: torch.Tensor, masks_enc: Sequence[torch.Tensor],
             masks_pred: Sequence[torch.Tensor]) -> torch.Tensor:
        """``pixels [B, C, H, W]``, ``masks_enc [1 x [B, K]]``, ``masks_pred [M x [B, T]]`` -> the scalar loss."""
        apply_masks, repeat = self.official.apply_masks, self.official.repeat_interleave_batch
        masks_enc, masks_pred = list(masks_enc), list(masks_pred)
        with torch.no_grad():
            h = self.target_encoder(pixels)
            h = F.layer_norm(h, (h.size(-1),))
            h = repeat(apply_masks(h, masks_pred), len(h), repeat=len(masks_enc))
        z = self.predictor(self.encoder(pixels, masks_enc), masks_enc, masks_pred)
        return F.smooth_l1_loss(z, h)

    def step(self, pixels: torch.Tensor, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor],
             autocast: bool) -> float:
        self.scheduler.step()
        self.wd_scheduler.step()
        with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = self.loss(pixels, masks_enc, masks_pred)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            m = self.momentum
            for param_q, param_k in zip(self.encoder.parameters(), self.target_encoder.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        return float(loss)

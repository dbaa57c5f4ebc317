"""Tiny configurations and golden-fixture access shared by the tests."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ijepa_hf import IJepaEncoderConfig, IJepaForPreTraining, IJepaMaskCollator, IJepaPretrainingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_CHECKPOINT = FIXTURES / "official-tiny.pth.tar"


def tiny_encoder_config(**overrides) -> IJepaEncoderConfig:
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    values.update(overrides)
    return IJepaEncoderConfig(**values)


def tiny_pretraining_config(**overrides) -> IJepaPretrainingConfig:
    encoder = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    encoder.update(overrides.pop("encoder", {}))
    predictor = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    predictor.update(overrides.pop("predictor", {}))
    return IJepaPretrainingConfig(encoder_config=encoder, predictor_config=predictor, **overrides)


def random_masks(batch_size: int, num_patches: int, num_context: int, num_blocks: int, num_targets: int,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sorted context indices [B, Kc] and target indices [B, M, Kt] (not multi-block shaped)."""
    generator = torch.Generator().manual_seed(seed)
    context = torch.stack([torch.randperm(num_patches, generator=generator)[:num_context].sort().values
                           for _ in range(batch_size)])
    targets = torch.stack([
        torch.stack([torch.randperm(num_patches, generator=generator)[:num_targets].sort().values
                     for _ in range(num_blocks)])
        for _ in range(batch_size)
    ])
    return context, targets


def golden() -> dict[str, torch.Tensor]:
    """The official implementation's inputs and outputs for official-tiny.pth.tar (see fixtures/README)."""
    return load_file(FIXTURES / "official-tiny.safetensors")


def golden_meta() -> dict:
    return json.loads((FIXTURES / "official-tiny.json").read_text())


def golden_target_masks(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([tensors[f"target_mask_{i}"] for i in range(golden_meta()["num_target_blocks"])], dim=1)


def write_idx(path: Path, array: np.ndarray, magic: bytes | None = None, truncate: int = 0) -> None:
    """A gzipped IDX file of uint8 ``array`` (Fashion-MNIST's format); ``magic`` / ``truncate`` break it on purpose."""
    header = magic if magic is not None else bytes([0, 0, 0x08, array.ndim])
    header += b"".join(struct.pack(">i", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with gzip.open(path, "wb") as f:
        f.write(data[: len(data) - truncate] if truncate else data)


def write_fake_fashion_mnist(folder: Path, train: int = 256, test: int = 64, seed: int = 0) -> Path:
    """Fashion-MNIST-shaped IDX files in ``folder``: 28 x 28 images whose brightness pattern depends on the label
    (a bar at a label-dependent row over noise), so that probes have something to find."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * int(label): 5 + 2 * int(label), 4:24] = 230
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Tiny pretraining runs (pretrain() and IJepaTrainer), shared by the training tests
# ----------------------------------------------------------------------------------------------------------------

# 4x4 patch grid: two target blocks of 3-4 patches, min_keep 0 (the official 10 is infeasible on 16 patches). On the
# embedded data these overrides change the demo's model (`parse_args`), so they set every field the demo sets, the
# official EMA included (the demo's is faster); its "small" recipe leaves the predictor and warm-up given here alone.
TINY_OVERRIDES = (
    "encoder.image_size=32,encoder.patch_size=8,encoder.hidden_size=32,encoder.num_hidden_layers=2,"
    "encoder.num_attention_heads=2,predictor.hidden_size=16,predictor.num_hidden_layers=2,"
    "predictor.num_attention_heads=2,min_keep=0,target_scale=[0.2,0.3],num_target_blocks=2,ema_momentum=[0.996,1.0]"
)


def tiny_argv(output_dir: Path | str, *extra: str, images: int = 48, batch: int = 8, steps: int = 8) -> list[str]:
    """The command line of a tiny pretraining run on the embedded scenes."""
    return [
        "--output_dir", str(output_dir), "--config_overrides", TINY_OVERRIDES,
        "--embedded_num_images", str(images), "--per_device_train_batch_size", str(batch),
        "--max_train_steps", str(steps), "--logging_steps", "2", "--warmup_steps", "2", *extra,
    ]


def run(output_dir: Path | str, *extra: str, **kwargs):
    """``pretrain()`` of :func:`tiny_argv` in this process."""
    from ijepa_hf.training import parse_args, pretrain

    return pretrain(parse_args(tiny_argv(output_dir, *extra, **kwargs)))


def save_meta_derived_model(path: Path) -> Path:
    """A tiny pretraining model saved at ``path`` as one derived from Meta's weights (their CC BY-NC 4.0 licence and
    base model recorded in its config), for the runs that continue it."""
    from ijepa_hf.licensing import record_weights_license

    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    model = IJepaForPreTraining(config)
    record_weights_license(model, "cc-by-nc-4.0", "facebook/ijepa_vith14_1k")
    model.save_pretrained(path)
    return path


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    """The pretraining models saved in folders ``a`` and ``b`` are bitwise equal."""
    left, right = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert left.keys() == right.keys()
    assert any(k.startswith("predictor.") for k in left) and any(k.startswith("target_encoder.") for k in left)
    different = [k for k in left if not torch.equal(left[k], right[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def copy_run(reference: Path, target: Path, *checkpoints: str) -> Path:
    """A copy of a run folder's ``run.json``, ``train_log.jsonl`` and the named checkpoints."""
    target.mkdir(parents=True)
    for name in ("run.json", "train_log.jsonl", *checkpoints):
        source = reference / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target / name)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_trainer_parts() -> tuple[IJepaForPreTraining, IJepaMaskCollator, torch.utils.data.Dataset]:
    """The tiny model, its mask collator and 16 procedural images, for ``IJepaTrainer``."""
    from ijepa_hf.data import PretrainTransform, ProceduralShapes

    torch.manual_seed(0)
    config = IJepaPretrainingConfig()
    config.update_from_string(TINY_OVERRIDES)
    return (IJepaForPreTraining(config), IJepaMaskCollator.from_config(config, seed=0),
            ProceduralShapes(16, image_size=32, transform=PretrainTransform(32)))


class WithUnreadableRows(torch.utils.data.Dataset):
    """``base`` with the rows in ``unreadable`` read as ``None`` (how the package's datasets hand over files that
    cannot be read: the collator drops them, and a batch with none left is ``None``)."""

    def __init__(self, base, unreadable):
        self.base, self.unreadable = base, set(unreadable)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        return None if index in self.unreadable else self.base[index]


def trainer_args(tmp_path: Path, **values):
    """``TrainingArguments`` of a 4-step CPU run (``values`` win)."""
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=4, use_cpu=True,
                remove_unused_columns=False, report_to="none", save_strategy="no", logging_steps=1, seed=0)
    return TrainingArguments(**{**base, **values})


# Per-image context lengths (test_context_lengths, test_packing): a 6x6 patch grid and two target blocks of 4-9
# patches, so that the contexts of one batch differ in length by several patches.
MASKS_PER_IMAGE = dict(min_keep=2, target_scale=(0.15, 0.25), num_target_blocks=2)


def per_image_config(**overrides) -> IJepaPretrainingConfig:
    # Weights 5x the usual init: attention far from uniform, so a token that should not be attended to shows.
    return tiny_pretraining_config(encoder={"image_size": 48, "initializer_range": 0.1},
                                   predictor={"initializer_range": 0.1},
                                   **{**MASKS_PER_IMAGE, "context_lengths": "per_image", **overrides})


def per_image_batch(batch_size: int = 6, batch_index: int = 0, **overrides) -> dict[str, torch.Tensor]:
    collator = IJepaMaskCollator(48, 8, **{**MASKS_PER_IMAGE, "context_lengths": "per_image", **overrides})
    masks = collator.sample_batch(batch_size, batch_index)
    lengths = masks["context_lengths"]
    assert lengths.unique().numel() > 2, "the test needs contexts of different lengths"
    pixels = torch.randn(batch_size, 3, 48, 48, generator=torch.Generator().manual_seed(batch_index))
    return {"pixel_values": pixels, **masks}


def grads_of(model: IJepaForPreTraining) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

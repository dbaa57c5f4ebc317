"""`ijepa-hf convert` and conversion to/from transformers' stock `ijepa` encoder."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoModelForPreTraining, IJepaConfig, IJepaModel

from ijepa_hf import IJepaEncoderModel, IJepaForPreTraining
from ijepa_hf.cli import main as cli_main
from ijepa_hf.conversion import (
    CheckpointMismatchError,
    encoder_from_transformers,
    encoder_to_transformers,
    load_official_checkpoint,
)

from tiny import GOLDEN_CHECKPOINT, golden, golden_target_masks, tiny_encoder_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def convert(*args: str) -> int:
    return cli_main(["convert", str(GOLDEN_CHECKPOINT), *args, "--num-heads", "3"])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    assert convert(str(out / "pretraining")) == 0
    assert convert(str(out / "target"), "--encoder-only") == 0
    assert convert(str(out / "context"), "--encoder-only", "--encoder", "context") == 0
    assert convert(str(out / "stock"), "--to-transformers", "--encoder", "context") == 0
    return out


def test_pretraining_repo_loads_with_auto_and_reproduces_golden(converted):
    model = AutoModelForPreTraining.from_pretrained(converted / "pretraining")
    assert isinstance(model, IJepaForPreTraining)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    g = golden()
    with torch.no_grad():
        output = model(g["pixel_values"], g["context_mask"], golden_target_masks(g))
    torch.testing.assert_close(output.predictions, g["predictions"], atol=1e-5, rtol=0)
    assert abs(output.loss.item() - g["loss_step0"].item()) < 1e-5
    assert (converted / "pretraining" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("which, reference", [("target", "target_encoder_full"), ("context", "context_encoder_full")])
def test_encoder_only_repo_uses_the_requested_encoder(converted, which, reference):
    encoder = AutoModel.from_pretrained(converted / which)
    assert isinstance(encoder, IJepaEncoderModel)
    g = golden()
    with torch.no_grad():
        output = encoder(g["pixel_values"])
    torch.testing.assert_close(output.last_hidden_state, g[reference], atol=1e-5, rtol=0)
    torch.testing.assert_close(output.pooler_output, g[reference].mean(1), atol=1e-5, rtol=0)


def test_stock_transformers_repo_loads_without_ijepa_hf(converted, tmp_path):
    g = golden()
    torch.save(g["pixel_values"], tmp_path / "pixels.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(converted / 'stock')!r})\n"
        "assert type(model).__name__ == 'IJepaModel', type(model)\n"
        "assert 'ijepa_hf' not in sys.modules\n"
        f"pixels = torch.load({str(tmp_path / 'pixels.pt')!r})\n"
        "with torch.no_grad(): out = model(pixels).last_hidden_state\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, capture_output=True)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), g["context_encoder_full"], atol=1e-5, rtol=0)


def test_our_encoder_imports_a_stock_transformers_repo(converted):
    encoder = encoder_from_transformers(str(converted / "stock"))
    stock = IJepaModel.from_pretrained(converted / "stock")
    pixels = golden()["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels).last_hidden_state, stock(pixels).last_hidden_state, atol=1e-5, rtol=0)


def test_round_trip_through_stock_model_with_context_mask_oracle():
    torch.manual_seed(0)
    ours = IJepaEncoderModel(tiny_encoder_config()).eval()
    stock = encoder_to_transformers(ours).eval()
    back = encoder_from_transformers(stock)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    pixels = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 2, 5, 7, 9, 15], [1, 3, 4, 8, 10, 11]])
    attention_mask = torch.zeros(2, 16, dtype=torch.long).scatter_(1, keep, 1)
    with torch.no_grad():
        masked = ours(pixels, context_mask=keep).last_hidden_state
        # The stock model restricted to the context keys through its public attention_mask is an independent oracle.
        oracle = stock(pixels, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(masked, torch.gather(oracle, 1, keep[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=0)


def test_encoder_from_a_stock_model_made_by_transformers():
    stock_config = IJepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8, layer_norm_eps=1e-6)
    stock = IJepaModel(stock_config).eval()
    encoder = encoder_from_transformers(stock)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels).last_hidden_state, stock(pixels).last_hidden_state, atol=1e-5, rtol=0)


def _tampered_checkpoint(tmp_path: Path, edit) -> Path:
    checkpoint = torch.load(GOLDEN_CHECKPOINT, weights_only=True)
    edit(checkpoint)
    path = tmp_path / "tampered.pth.tar"
    torch.save(checkpoint, path)
    return path


def test_missing_key_is_an_error_listing_it(tmp_path, capsys):
    path = _tampered_checkpoint(tmp_path, lambda c: c["predictor"].pop("module.predictor_norm.weight"))
    code = cli_main(["convert", str(path), str(tmp_path / "out"), "--num-heads", "3"])
    assert code == 2
    message = capsys.readouterr().err
    assert "missing keys" in message and "norm.weight" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_unexpected_and_misshaped_keys_are_errors(tmp_path):
    def edit(checkpoint):
        checkpoint["target_encoder"]["module.blocks.0.extra"] = torch.zeros(1)
        checkpoint["target_encoder"]["module.norm.bias"] = torch.zeros(7)
    path = _tampered_checkpoint(tmp_path, edit)
    from ijepa_hf.conversion import convert_official_checkpoint, infer_official_config
    checkpoint = load_official_checkpoint(path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys.*blocks\.0\.extra(.|\n)*mis-shaped keys.*norm\.bias"):
        convert_official_checkpoint(checkpoint, infer_official_config(load_official_checkpoint(GOLDEN_CHECKPOINT), num_heads=3))


def test_wrong_architecture_is_an_error(tmp_path):
    from ijepa_hf.configuration_ijepa_hf import IJepaPretrainingConfig
    from ijepa_hf.conversion import convert_official_checkpoint
    config = IJepaPretrainingConfig(
        encoder_config=dict(image_size=96, patch_size=8, hidden_size=96, num_hidden_layers=4, num_attention_heads=3),
        predictor_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3))
    with pytest.raises(CheckpointMismatchError, match="missing keys.*blocks.3"):
        convert_official_checkpoint(GOLDEN_CHECKPOINT, config)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    bogus = tmp_path / "bogus.pth.tar"
    torch.save({"state_dict": {}}, bogus)
    with pytest.raises(ValueError, match="not an official I-JEPA checkpoint"):
        load_official_checkpoint(bogus)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="Could not read"):
        load_official_checkpoint(garbage)
    # A download cut short, and a file that is no checkpoint at all: torch's own message (a dozen lines that end in
    # "please file an issue", and for the latter the advice to load with weights_only=False, which runs whatever code
    # the file holds) became the error; it now says what the file is likely to be and what to do.
    cut = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    cut.write_bytes(GOLDEN_CHECKPOINT.read_bytes()[:1000])
    for path, expected in ((cut, "cut off"), (garbage, "not a checkpoint torch wrote")):
        with pytest.raises(ValueError) as error:
            load_official_checkpoint(path)
        message = str(error.value)
        assert expected in message and f"{path.stat().st_size:,} bytes" in message, message
        assert "\n" not in message and "file an issue" not in message and "weights_only=False" not in message
    pickled = tmp_path / "objects.pth.tar"  # a checkpoint with an object beyond tensors: named, never unpickled
    torch.save({"encoder": {}, "args": argparse.Namespace(lr=1e-3)}, pickled)
    with pytest.raises(ValueError, match="holds objects other than tensors .* not unpickled .*argparse.Namespace"):
        load_official_checkpoint(pickled)


# ------------------------------------------------------------------------------------------------------------------
# Head counts are never guessed (issue 12)
# ------------------------------------------------------------------------------------------------------------------


def _shapes_only_checkpoint(width: int, predictor_width: int = 384) -> dict:
    """An official-layout checkpoint with just the tensors `infer_official_config` reads (zeros, tiny grid)."""
    encoder = {
        "patch_embed.proj.weight": torch.zeros(width, 3, 8, 8),
        "pos_embed": torch.zeros(1, 16, width),
        "blocks.0.attn.qkv.bias": torch.zeros(3 * width),
        "blocks.0.mlp.fc1.weight": torch.zeros(4 * width, width),
    }
    predictor = {
        "predictor_embed.weight": torch.zeros(predictor_width, width),
        "predictor_blocks.0.attn.qkv.bias": torch.zeros(3 * predictor_width),
        "predictor_blocks.0.mlp.fc1.weight": torch.zeros(4 * predictor_width, predictor_width),
    }
    return {"encoder": encoder, "target_encoder": encoder, "predictor": predictor}


@pytest.mark.parametrize("width, heads", [(192, 3), (384, 6), (768, 12), (1024, 16), (1280, 16), (1408, 16)])
def test_official_widths_get_the_official_head_counts(width, heads):
    from ijepa_hf.conversion import infer_official_config

    config = infer_official_config(_shapes_only_checkpoint(width))
    assert config.encoder_config.num_attention_heads == heads
    # The official code gives the predictor the encoder's head count.
    assert config.predictor_config.num_attention_heads == heads


def test_other_widths_need_num_heads():
    from ijepa_hf.conversion import infer_official_config

    with pytest.raises(ValueError, match=r"--num-heads") as error:
        infer_official_config(_shapes_only_checkpoint(256))
    assert "256" in str(error.value) and "num_heads=" in str(error.value)
    config = infer_official_config(_shapes_only_checkpoint(256), num_heads=8)
    assert config.encoder_config.num_attention_heads == config.predictor_config.num_attention_heads == 8


def test_golden_checkpoint_without_num_heads_is_refused(tmp_path, capsys):
    from ijepa_hf.conversion import convert_official_checkpoint, convert_official_encoder

    code = cli_main(["convert", str(GOLDEN_CHECKPOINT), str(tmp_path / "out")])
    assert code == 2
    message = capsys.readouterr().err
    assert "--num-heads" in message and "96" in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="--num-heads"):
        convert_official_checkpoint(GOLDEN_CHECKPOINT)
    with pytest.raises(ValueError, match="--num-heads"):
        convert_official_encoder(GOLDEN_CHECKPOINT)


def test_python_api_num_heads_gives_parity():
    from ijepa_hf.conversion import convert_official_checkpoint, convert_official_encoder

    g = golden()
    model = convert_official_checkpoint(GOLDEN_CHECKPOINT, num_heads=3)
    encoder = convert_official_encoder(GOLDEN_CHECKPOINT, num_heads=3)
    assert model.config.encoder_config.num_attention_heads == model.config.predictor_config.num_attention_heads == 3
    with torch.no_grad():
        torch.testing.assert_close(encoder(g["pixel_values"]).last_hidden_state, g["target_encoder_full"],
                                   atol=1e-5, rtol=0)
        output = model(g["pixel_values"], g["context_mask"], golden_target_masks(g))
    torch.testing.assert_close(output.predictions, g["predictions"], atol=1e-5, rtol=0)


def test_card_records_the_head_count_and_where_it_came_from(converted):
    card = (converted / "pretraining" / "README.md").read_text()
    assert "| `encoder.num_attention_heads` | 3 |" in card and "| `predictor.num_attention_heads` | 3 |" in card
    assert "3 attention heads (given with `--num-heads`)" in card


def test_encoder_from_a_transformers_4x_format_repo(tmp_path):
    """A repo as transformers 4.x wrote it: ViT-style legacy key names, a 4.x config (no dtype field)."""
    import json

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    stock = IJepaModel(IJepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=32, patch_size=8, layer_norm_eps=1e-6)).eval()
    stock.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    assert "encoder.layer.0.attention.attention.query.weight" in weights  # the 4.x names
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("dtype", None)
    config.update(transformers_version="4.47.1", torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    encoder = encoder_from_transformers(str(tmp_path))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels).last_hidden_state, stock(pixels).last_hidden_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", [[], ["--all"]])
def test_convert_never_writes_over_a_folder_holding_files_unasked(tmp_path, capsys, mode):
    """`convert` into a folder holding a model (a trained run given by mistake, an earlier conversion) replaced its
    weights, config and card without a word. It is refused before the checkpoint is read, naming --overwrite, which
    writes there."""
    out = tmp_path / "run"
    target = out / "encoder" if mode else out
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"a trained run's weights")
    (target / "README.md").write_text("its card")
    assert convert(str(out), *mode) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (target / "model.safetensors").read_bytes() == b"a trained run's weights"
    assert convert(str(out), *mode, "--overwrite") == 0
    assert (target / "model.safetensors").read_bytes() != b"a trained run's weights"
    assert convert(str(tmp_path / "new"), *mode) == 0  # a new or empty folder needs nothing

"""Dense features: the encoder's timm-style intermediate layers, `IJepaBackbone` / `AutoBackbone`, and a
transformers dense head (UperNet) on an I-JEPA backbone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, UperNetConfig, UperNetForSemanticSegmentation

from hub_utils import run_hub_script
from ijepa_hf import IJepaBackbone, IJepaBackboneConfig, IJepaEncoderModel, IJepaForPreTraining

from tiny import tiny_encoder_config, tiny_pretraining_config


@pytest.fixture(scope="module")
def encoder() -> IJepaEncoderModel:
    torch.manual_seed(0)
    return IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()


@torch.no_grad()
def test_forward_intermediates_is_timm_like(encoder):
    pixels = torch.randn(2, 3, 32, 48)  # a 4 x 6 patch grid: rows and columns must not be swapped
    reference = encoder(pixels, output_hidden_states=True)
    blocks = reference.hidden_states[1:]  # block outputs, before the final norm

    final, maps = encoder.forward_intermediates(pixels)
    torch.testing.assert_close(final, reference.last_hidden_state)
    assert [m.shape for m in maps] == [(2, 32, 4, 6)] * 4
    # Raster order: token r * cols + c is the map's [:, :, r, c].
    torch.testing.assert_close(maps[2][:, :, 1, 5], blocks[2][:, 1 * 6 + 5])

    last_two = encoder.forward_intermediates(pixels, indices=2, norm=True, output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(last_two[0], encoder.norm(blocks[2]))
    torch.testing.assert_close(last_two[1], reference.last_hidden_state)
    chosen = encoder.forward_intermediates(pixels, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(chosen[0], blocks[0])
    torch.testing.assert_close(chosen[1], blocks[3])
    early_final, early = encoder.forward_intermediates(pixels, indices=[1], stop_early=True, output_fmt="NLC")
    torch.testing.assert_close(early[0], blocks[1])
    torch.testing.assert_close(early_final, encoder.norm(blocks[1]))

    layers = encoder.get_intermediate_layers(pixels, n=2, reshape=True, norm=True)
    assert isinstance(layers, tuple) and [m.shape for m in layers] == [(2, 32, 4, 6)] * 2
    torch.testing.assert_close(layers[1].flatten(2).transpose(1, 2), reference.last_hidden_state)

    for bad in (5, 0, [4], [-5]):
        with pytest.raises(ValueError, match="blocks|block indices"):
            encoder.forward_intermediates(pixels, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        encoder.forward_intermediates(pixels, output_fmt="NHWC")


def test_backbone_config_stages_and_round_trip(tmp_path: Path):
    config = IJepaBackboneConfig(**tiny_encoder_config(num_hidden_layers=4).to_dict(), out_indices=[1, -1])
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert config.out_features == ["stage1", "stage4"]
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is IJepaBackboneConfig
    assert (loaded.out_features, loaded.out_indices) == (["stage1", "stage4"], [1, -1])
    with pytest.raises(ValueError, match="out_features"):
        IJepaBackboneConfig(**tiny_encoder_config().to_dict(), out_features=["stage9"])


@torch.no_grad()
def test_backbone_feature_maps_from_encoder_and_pretraining_repos(encoder, tmp_path: Path):
    encoder.save_pretrained(tmp_path / "encoder")
    backbone = IJepaBackbone.from_pretrained(tmp_path / "encoder", out_indices=[0, 2, 4])
    assert type(backbone.config) is IJepaBackboneConfig and backbone.config.model_type == "ijepa_hf_backbone"
    assert backbone.out_features == ["stem", "stage2", "stage4"] and backbone.channels == [32, 32, 32]
    pixels = torch.randn(2, 3, 32, 40)
    output = backbone(pixels)
    assert output.hidden_states is None and [m.shape for m in output.feature_maps] == [(2, 32, 4, 5)] * 3
    _, expected = encoder.forward_intermediates(pixels, indices=[1, 3], norm=True)
    torch.testing.assert_close(output.feature_maps[1], expected[0])
    torch.testing.assert_close(output.feature_maps[2], expected[1])
    hidden = encoder(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(output.feature_maps[0].flatten(2).transpose(1, 2), encoder.norm(hidden[0]))
    assert len(backbone(pixels, output_hidden_states=True).hidden_states) == 5
    tokens = IJepaBackbone.from_pretrained(tmp_path / "encoder", reshape_hidden_states=False, apply_layernorm=False)
    torch.testing.assert_close(tokens(pixels).feature_maps[0], hidden[-1])  # default: the last stage

    # A pretraining repo gives its target encoder.
    torch.manual_seed(1)
    pretraining = IJepaForPreTraining(tiny_pretraining_config(encoder={"num_hidden_layers": 4})).eval()
    pretraining.update_target_encoder(0.0)
    pretraining.target_encoder.blocks[0].mlp.fc2.bias.add_(1.0)  # target != context
    pretraining.save_pretrained(tmp_path / "pretraining")
    from_pretraining = IJepaBackbone.from_pretrained(tmp_path / "pretraining", out_indices=[-1])
    torch.testing.assert_close(
        from_pretraining(pixels).feature_maps[0].flatten(2).transpose(1, 2),
        pretraining.target_encoder(pixels).last_hidden_state,
    )
    # A backbone repo keeps its stages; keyword arguments override them.
    backbone.save_pretrained(tmp_path / "backbone")
    assert IJepaBackbone.from_pretrained(tmp_path / "backbone").out_features == ["stem", "stage2", "stage4"]
    assert IJepaBackbone.from_pretrained(tmp_path / "backbone", out_indices=[3]).out_features == ["stage3"]


def test_upernet_trains_on_an_ijepa_backbone(tmp_path: Path):
    torch.manual_seed(0)
    backbone_config = IJepaBackboneConfig(**tiny_encoder_config(num_hidden_layers=4).to_dict(), out_indices=[1, 2, 3, 4])
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=16, pool_scales=[1, 2], auxiliary_in_channels=32,
        auxiliary_channels=8, num_labels=3,
    )
    model = UperNetForSemanticSegmentation(config).train()
    assert type(model.backbone) is IJepaBackbone
    pixels, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    output = model(pixels, labels=labels)
    assert output.logits.shape == (2, 3, 32, 32)
    output.loss.backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert model.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0

    model.save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits)


@pytest.mark.parametrize("kind", ["encoder", "pretraining"])
def test_auto_backbone_from_a_local_folder(tmp_path: Path, monkeypatch, kind: str):
    # transformers 5.24-5.25's AutoBackbone.from_pretrained asks the Hub whether a name is a repo before anything
    # else, which fails for every local folder (HFValidationError for an absolute path, an offline error for a
    # relative one); ijepa_hf routes its own folders to IJepaBackbone.from_pretrained.
    from transformers import AutoBackbone

    torch.manual_seed(0)
    if kind == "encoder":
        model = IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()
        encoder = model
    else:
        model = IJepaForPreTraining(tiny_pretraining_config(encoder={"num_hidden_layers": 4})).eval()
        encoder = model.target_encoder
    model.save_pretrained(tmp_path / "repo")
    for name in (str(tmp_path / "repo"), "repo"):  # absolute, and relative to the working directory
        monkeypatch.chdir(tmp_path)
        backbone = AutoBackbone.from_pretrained(name, out_indices=[2, 4]).eval()
        assert type(backbone) is IJepaBackbone and backbone.out_features == ["stage2", "stage4"]
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            _, expected = encoder.forward_intermediates(pixels, indices=[1, 3], norm=True)
            for got, want in zip(backbone(pixels).feature_maps, expected):
                torch.testing.assert_close(got, want)
    # other libraries' folders are left to transformers as they are
    with pytest.raises(Exception) as caught:
        AutoBackbone.from_pretrained(str(tmp_path / "missing"))
    assert "ijepa" not in str(caught.value).lower()


def test_auto_backbone_from_an_encoder_repo_on_the_hub(fake_hub: str, tmp_path: Path):
    repo = "test-org/tiny-ijepa-backbone"
    run_hub_script(
        f"""
        import torch
        import ijepa_hf
        from tiny import tiny_encoder_config
        torch.manual_seed(0)
        encoder = ijepa_hf.IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()
        encoder.push_to_hub("{repo}")
        torch.save(encoder.state_dict(), r"{tmp_path / 'encoder.pt'}")
        """,
        fake_hub, tmp_path / "pusher",
    )
    run_hub_script(
        f"""
        import torch
        import ijepa_hf
        from transformers import AutoBackbone
        from tiny import tiny_encoder_config
        backbone = AutoBackbone.from_pretrained("{repo}", out_indices=[2, 4])
        assert type(backbone) is ijepa_hf.IJepaBackbone, type(backbone)
        assert backbone.out_features == ["stage2", "stage4"], backbone.out_features
        encoder = ijepa_hf.IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()
        encoder.load_state_dict(torch.load(r"{tmp_path / 'encoder.pt'}"))
        pixels = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            maps = backbone.eval()(pixels).feature_maps
            _, expected = encoder.forward_intermediates(pixels, indices=[1, 3], norm=True)
        for got, want in zip(maps, expected):
            torch.testing.assert_close(got, want)
        # a dense head naming the repo, as transformers' docs name a backbone
        from transformers import UperNetConfig, UperNetForSemanticSegmentation
        from transformers.backbone_utils import load_backbone
        config = UperNetConfig(backbone="{repo}", backbone_kwargs={{"out_indices": [1, 2, 3, 4]}}, num_labels=3,
                               hidden_size=16, auxiliary_in_channels=32, use_pretrained_backbone=False)
        assert type(load_backbone(config)) is ijepa_hf.IJepaBackbone
        head = UperNetForSemanticSegmentation(config).eval()
        assert head.backbone.out_features == ["stage1", "stage2", "stage3", "stage4"], head.backbone.out_features
        with torch.no_grad():
            assert head(pixels).logits.shape == (1, 3, 32, 32)
        print("ok")
        """,
        fake_hub, tmp_path / "puller",
    )


def test_a_dense_head_takes_an_encoder_or_pretraining_config_as_its_backbone_config(tmp_path: Path):
    """What `UperNetConfig(backbone=<repo>, backbone_kwargs={"out_indices": ...})` makes of an encoder or pretraining
    repo (the repo's own config with the backbone arguments set on it): the backbone built from it is the encoder,
    with those arguments, saved and reloaded with the head."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).save_pretrained(tmp_path / "encoder")
    IJepaForPreTraining(tiny_pretraining_config(encoder={"num_hidden_layers": 4})).save_pretrained(
        tmp_path / "pretraining")
    for source in ("encoder", "pretraining"):
        config_dict, _ = PretrainedConfig.get_config_dict(str(tmp_path / source))  # as transformers does
        config_dict.update({"out_indices": [1, 2, 3, 4]})
        backbone_config = CONFIG_MAPPING[config_dict["model_type"]](**config_dict)
        config = UperNetConfig(backbone_config=backbone_config, num_labels=3, hidden_size=16,
                               auxiliary_in_channels=32)
        head = UperNetForSemanticSegmentation(config).eval()
        assert isinstance(head.backbone, IJepaBackbone) and head.backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]
        with torch.no_grad():
            assert head(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3, 32, 32)
        head.save_pretrained(tmp_path / f"upernet-{source}")
        reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path / f"upernet-{source}").eval()
        assert reloaded.backbone.out_features == ["stage1", "stage2", "stage3", "stage4"]


def test_dpt_depth_estimation_reads_the_mean_token_where_a_cls_token_would_be():
    """DPT's neck takes the first token of every stage as its readout: with `readout_token="mean"` (token
    sequences, the mean token first) DPT's depth head runs on an I-JEPA backbone, for each readout type."""
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone_config = IJepaBackboneConfig.from_encoder_config(
        tiny_encoder_config(num_hidden_layers=4), out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
        readout_token="mean")
    backbone = IJepaBackbone(backbone_config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = backbone(pixels).feature_maps
        tokens = backbone.forward_intermediates(pixels, indices=[0, 1, 2, 3], norm=True, output_fmt="NLC")[1]
    for got, want in zip(maps, tokens):
        assert got.shape == (2, 17, 32)
        torch.testing.assert_close(got[:, 1:], want)
        torch.testing.assert_close(got[:, 0], want.mean(dim=1))
    for readout in ("ignore", "add", "project"):
        config = DPTConfig(backbone_config=backbone_config, readout_type=readout, neck_hidden_sizes=[8, 16, 32, 32],
                           fusion_hidden_size=16, head_in_index=-1)
        with torch.no_grad():
            depth = DPTForDepthEstimation(config).eval()(pixels).predicted_depth
        assert depth.shape[0] == 2 and torch.isfinite(depth).all()
    with pytest.raises(ValueError, match="readout_token .* needs reshape_hidden_states=False"):
        IJepaBackboneConfig.from_encoder_config(tiny_encoder_config(), readout_token="mean")

"""Remote code survives transformers' own save and push: a model loaded with ``trust_remote_code`` and re-saved by
``save_pretrained`` or ``Trainer`` keeps loading where ijepa_hf is not installed."""

from __future__ import annotations

from pathlib import Path

import torch
from hub_utils import run_hub_script

from ijepa_hf import IJepaEncoderModel, make_image_processor
from ijepa_hf.hub import save_with_remote_code

from tiny import tiny_encoder_config

_WITHOUT_IJEPA_HF = """
import sys
sys.modules["ijepa_hf"] = None  # every import of the package fails: only shipped code can run
"""


def test_a_remote_code_classifier_re_saved_by_trainer_loads_without_ijepa_hf(fake_hub: str, tmp_path: Path):
    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config()).eval()
    save_with_remote_code(encoder, tmp_path / "encoder", image_processor=make_image_processor(32))
    run_hub_script(f"""
        from ijepa_hf.hub import push_folder
        push_folder(r"{tmp_path / 'encoder'}", "test-org/remote-resave-encoder")
        """, fake_hub, tmp_path / "pusher")
    # a user's fine-tuning script, with and without ijepa_hf installed: Trainer saves and pushes the classifier
    for installed in (False, True):
        name = f"finetuned-{'with' if installed else 'without'}"
        run_hub_script((_WITHOUT_IJEPA_HF if not installed else "import ijepa_hf\n") + f"""
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments
model = AutoModelForImageClassification.from_pretrained("test-org/remote-resave-encoder", num_labels=3,
                                                        trust_remote_code=True)
processor = AutoImageProcessor.from_pretrained("test-org/remote-resave-encoder")
args = TrainingArguments(r"{tmp_path / name}", max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                         push_to_hub=True, hub_model_id="test-org/remote-resave-{name}")
data = [{{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3}} for i in range(4)]
trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=processor)
trainer.train()
trainer.save_model()
trainer.push_to_hub()
""", fake_hub, tmp_path / f"trainer-{name}")
        # the saved folder and the pushed repo, loaded in one process without ijepa_hf
        run_hub_script(_WITHOUT_IJEPA_HF + f"""
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline
for source in (r"{tmp_path / name}", "test-org/remote-resave-{name}"):
    model = AutoModelForImageClassification.from_pretrained(source, trust_remote_code=True).eval()
    assert type(model).__name__ == "IJepaEncoderForImageClassification", (source, type(model))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 3), source
    classify = pipeline("image-classification", model=source, trust_remote_code=True)
    assert len(classify(Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)))) == 3, source
""", fake_hub, tmp_path / f"loader-{name}")


def test_an_encoder_repo_with_its_code_loads_through_auto_backbone_without_ijepa_hf(fake_hub: str, tmp_path: Path):
    torch.manual_seed(0)
    encoder = IJepaEncoderModel(tiny_encoder_config(num_hidden_layers=4)).eval()
    save_with_remote_code(encoder, tmp_path / "encoder", image_processor=make_image_processor(32))
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        _, expected = encoder.forward_intermediates(pixels, indices=[1, 3], norm=True)
    torch.save({"pixels": pixels, "maps": expected}, tmp_path / "expected.pt")
    run_hub_script(f"""
        from ijepa_hf.hub import push_folder
        push_folder(r"{tmp_path / 'encoder'}", "test-org/remote-backbone-encoder")
        """, fake_hub, tmp_path / "pusher")
    run_hub_script(_WITHOUT_IJEPA_HF + f"""
import torch
from transformers import AutoBackbone
backbone = AutoBackbone.from_pretrained("test-org/remote-backbone-encoder", trust_remote_code=True,
                                        out_indices=[2, 4]).eval()
assert type(backbone).__module__.startswith("transformers_modules."), type(backbone)
assert backbone.out_features == ["stage2", "stage4"], backbone.out_features
expected = torch.load(r"{tmp_path / 'expected.pt'}")
with torch.no_grad():
    maps = backbone(expected["pixels"]).feature_maps
for got, want in zip(maps, expected["maps"]):
    torch.testing.assert_close(got, want)
""", fake_hub, tmp_path / "loader")

"""Model cards for I-JEPA checkpoints.

:func:`make_model_card` renders ``model_card_template.md`` (shipped inside the package, so it works from an
installed wheel; a copy for browsing lives in ``model_cards/`` at the repository root) into a
:class:`huggingface_hub.ModelCard`. The YAML metadata is built with :class:`huggingface_hub.ModelCardData`
so that the Hub indexes it (library, pipeline, licence, datasets, base model, ``model-index`` results), and the
body documents what users of self-supervised checkpoints keep asking for: how to pool features (I-JEPA has no
[CLS] token), the training recipe, and the licence of weights derived from Meta's release.

Card functions need only ``huggingface_hub`` (and Jinja2, which renders the template); they never build a
model, so cards are cheap to write from conversion and training scripts. :func:`model_card_for` is the default
card of a model (what :func:`ijepa_hf.hub.push_model` and ``model.push_to_hub`` upload),
:func:`card_for_converted_checkpoint` the card of ``ijepa-hf convert``. Publishing lives in :mod:`ijepa_hf.hub`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, get_args

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .licensing import META_WEIGHTS_LICENSE, weights_license

if TYPE_CHECKING:  # only for annotations: importing transformers here would make card writing slow
    from transformers import PreTrainedModel

__all__ = [
    "BASE_TAGS",
    "IJEPA_BIBTEX",
    "META_WEIGHTS_LICENSE",
    "MODEL_CARD_TEMPLATE_PATH",
    "ModelKind",
    "card_for_converted_checkpoint",
    "continue_pretraining_code",
    "default_loading_code",
    "example_encoder_card",
    "license_statement",
    "make_model_card",
    "model_card_for",
    "summarize_config",
]

ModelKind = Literal["encoder", "pretraining", "predictor", "classifier"]

MODEL_CARD_TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")

BASE_TAGS = ("ijepa", "jepa", "self-supervised", "vision")

IJEPA_BIBTEX = """@inproceedings{assran2023ijepa,
  title     = {Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture},
  author    = {Assran, Mahmoud and Duval, Quentin and Misra, Ishan and Bojanowski, Piotr and Vincent, Pascal
               and Rabbat, Michael and LeCun, Yann and Ballas, Nicolas},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  pages     = {15619--15629},
  year      = {2023},
  eprint    = {2301.08243},
  archivePrefix = {arXiv}
}"""

# Anything converted, pretrained further or fine-tuned from the official checkpoints inherits their licence
# (META_WEIGHTS_LICENSE, see `ijepa_hf.licensing`), so we refuse to label such weights with a more permissive licence.
_META_BASE_PREFIXES = ("facebook/ijepa",)

# Friendly labels (and display order) for the `training` dict; unknown keys are shown after these.
_TRAINING_LABELS: dict[str, str] = {
    "initialised_from": "Initialised from",
    "evaluated_model": "Evaluated model",
    "data": "Training data",
    "dataset": "Training data",
    "validation_data": "Validation data",
    "image_size": "Image size",
    "augmentations": "Augmentations",
    "epochs": "Epochs",
    "steps": "Optimisation steps",
    "batch_size": "Batch size",
    "batch": "Batch size",
    "masks": "Masking",
    "optimizer": "Optimiser",
    "lr_schedule": "Learning-rate schedule",
    "wd_schedule": "Weight-decay schedule",
    "ema_schedule": "Target-encoder EMA momentum",
    "schedules": "Schedules",
    "loss": "Loss",
    "precision": "Precision",
    "hardware": "Hardware",
    "duration": "Training time",
    "held_out_loss": "Held-out loss (last evaluation)",
    "online_knn": "Online k-NN accuracy (last probe)",
}

# Config fields worth showing in the architecture table, in display order.
_SUMMARY_KEYS = (
    "model_type", "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers",
    "num_attention_heads", "intermediate_size", "mlp_ratio", "encoder_hidden_size", "num_labels", "pooler_norm",
    "num_target_blocks", "context_scale", "target_scale", "target_aspect_ratio", "loss", "ema_momentum",
)


def _format_value(value: Any) -> str:
    """One-line, human-readable rendering of a config/training value for a Markdown table cell."""
    if isinstance(value, Mapping):
        text = ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        inner = ", ".join(_format_value(v) for v in value)
        # Short numeric sequences read as ranges/sizes, e.g. "(0.85, 1.0)"; others as plain lists.
        text = f"({inner})" if all(isinstance(v, (int, float)) for v in value) else inner
    elif isinstance(value, float):
        text = repr(value) if len(repr(value)) <= 8 else format(value, ".6g")  # keep "1.0", tame 0.30000000000000004
    else:
        text = str(value)
    # A raw "|" or newline would break the Markdown table.
    return text.replace("|", "\\|").replace("\n", " ")


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def summarize_config(config_or_model: Any, extra_keys: Sequence[str] = ()) -> dict[str, Any]:
    """The architecture fields of a transformers config (or model) worth showing in a card.

    Works with the stock ``IJepaConfig`` and the ``ijepa_hf`` configs; nested sub-configs such as
    ``encoder_config``/``predictor_config`` are flattened to ``encoder.hidden_size`` etc. Given a model, its
    parameter count is added as ``num_parameters``.
    """
    config = getattr(config_or_model, "config", config_or_model)
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = (*_SUMMARY_KEYS, *extra_keys)
    summary: dict[str, Any] = {k: data[k] for k in keys if data.get(k) is not None}
    if "num_labels" not in summary and data.get("id2label") and len(data["id2label"]) > 2:
        summary["num_labels"] = len(data["id2label"])  # 2 is transformers' default, not a real head
    for sub_key, sub in data.items():
        if sub_key.endswith("_config") and isinstance(sub, Mapping):
            prefix = sub_key[: -len("_config")]
            summary.update({f"{prefix}.{k}": sub[k] for k in keys if k != "model_type" and sub.get(k) is not None})
    if hasattr(config_or_model, "num_parameters"):
        summary["num_parameters"] = f"{config_or_model.num_parameters():,}"
    return summary


def default_loading_code(model_name: str, kind: ModelKind, custom_code: bool = False,
                         subfolder: str | None = None) -> str:
    """A short, runnable snippet that loads ``model_name`` (its ``subfolder``, if given) and extracts pooled image
    features.

    ``custom_code`` means the checkpoint uses an ``ijepa_hf_*`` model type, which the Auto classes only know
    once ``ijepa_hf`` is imported (or with ``trust_remote_code=True`` when the repo ships its modelling code).
    """
    auto_class = {"classifier": "AutoModelForImageClassification", "pretraining": "AutoModelForPreTraining"}.get(
        kind, "AutoModel"
    )
    lines = ["import torch", "from PIL import Image", f"from transformers import AutoImageProcessor, {auto_class}"]
    if custom_code:
        lines += ["", "import ijepa_hf  # noqa: F401  registers the ijepa_hf_* model types with the Auto classes"]
    where = f', subfolder="{subfolder}"' if subfolder else ""
    lines += [
        "",
        f'repo_id = "{model_name}"',
        f"processor = AutoImageProcessor.from_pretrained(repo_id{where})",
        f"model = {auto_class}.from_pretrained(repo_id{where}).eval()",
    ]
    if kind == "predictor":
        lines += [
            "",
            "# The predictor consumes context-encoder features plus context/target patch indices (see the",
            "# ijepa_hf documentation); it does not take images. Load the matching encoder for features.",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        'image = Image.open("example.jpg").convert("RGB")',
        'inputs = processor(images=image, return_tensors="pt")',
    ]
    if kind == "classifier":
        lines += [
            "with torch.no_grad():",
            "    logits = model(**inputs).logits",
            "print(model.config.id2label[logits.argmax(-1).item()])",
        ]
        return "\n".join(lines) + "\n"
    encoder = "model"
    if kind == "pretraining":
        lines += ['encoder = model.encoder_for("target")  # the EMA target encoder is the one evaluated in the paper']
        encoder = "encoder"
    lines += [
        "with torch.no_grad():",
        f"    patch_features = {encoder}(**inputs).last_hidden_state  # (1, num_patches, hidden_size)",
        "# I-JEPA has no [CLS] token: as in the paper, average-pool the patch features for one image embedding.",
        "image_embedding = patch_features.mean(dim=1)  # (1, hidden_size)",
    ]
    return "\n".join(lines) + "\n"


@lru_cache(maxsize=1)
def _template_macros() -> Any:
    """The template's macros (``license_statement``, ``continue_pretraining_code``), callable from Python."""
    import jinja2  # as huggingface_hub's ModelCard.from_template: needed only to render

    return jinja2.Template(MODEL_CARD_TEMPLATE_PATH.read_text(encoding="utf-8")).module


def license_statement(license: str) -> str:
    """The licence paragraph of the card (the template's ``license_statement`` macro); spells out the
    non-commercial terms of Meta-derived weights."""
    return str(_template_macros().license_statement(license, license == META_WEIGHTS_LICENSE))


def _eval_result(entry: Mapping[str, Any]) -> EvalResult:
    """A plain dict -> ``EvalResult``, defaulting the fields that are implied for image models."""
    fields = {"task_type": "image-classification", **entry}
    if "dataset_name" not in fields or "metric_type" not in fields or "metric_value" not in fields:
        raise ValueError(
            "each eval result needs at least `dataset_name`, `metric_type` and `metric_value` "
            f"(optionally task_type, task_name, dataset_type, dataset_split, metric_name, ...); got {dict(entry)}"
        )
    fields.setdefault("dataset_type", fields["dataset_name"])
    return EvalResult(**fields)


def make_model_card(
    *,
    model_name: str,
    kind: ModelKind,
    config_summary: Mapping[str, Any],
    license: str = "apache-2.0",
    datasets: str | Sequence[str] | None = None,
    base_model: str | Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    training: Mapping[str, Any] | None = None,
    eval_results: Sequence[Mapping[str, Any]] | None = None,
    loading_code: str | None = None,
    conversion: Mapping[str, Any] | None = None,
    extra: str | None = None,
) -> ModelCard:
    """Build the README (model card) of an I-JEPA checkpoint.

    Args:
        model_name: Hub repo id (``"user/ijepa-vit-tiny"``) or display name; used as title, in the loading code
            and as the ``model-index`` name.
        kind: What the repository holds: ``"encoder"``, ``"pretraining"`` (context encoder + predictor + target
            encoder), ``"predictor"`` or ``"classifier"`` (encoder + linear head).
        config_summary: Architecture fields shown as a table, e.g. from :func:`summarize_config`. A
            ``model_type`` starting with ``ijepa_hf`` makes the loading code import ``ijepa_hf``.
        license: Hub licence id. Weights converted or fine-tuned from Meta's checkpoints must use
            ``"cc-by-nc-4.0"`` (enforced when ``base_model`` is a ``facebook/ijepa*`` repo).
        datasets: Hub dataset id(s) used for (pre)training.
        base_model: Hub id(s) of the model this one was converted or fine-tuned from.
        tags: Extra tags, added after ``ijepa, jepa, self-supervised, vision``.
        training: The recipe, e.g. ``{"data": ..., "steps": ..., "batch_size": ..., "masks": {...},
            "lr_schedule": ..., "ema_schedule": ...}``; values may be scalars, lists or dicts.
        eval_results: Dicts of :class:`huggingface_hub.EvalResult` fields; ``dataset_name``, ``metric_type``
            and ``metric_value`` are required, ``task_type`` defaults to ``"image-classification"`` and
            ``dataset_type`` to ``dataset_name``. They go into the ``model-index`` metadata and a results table.
        loading_code: Python snippet for "How to use"; defaults to :func:`default_loading_code`.
        conversion: For repos converted from an official checkpoint, the facts of the conversion, rendered as
            a "Conversion" section (and, for pretraining repos, "Continue pretraining"): ``source`` (file name),
            ``release``, ``num_heads`` and ``num_heads_source``, ``encoder`` (``"target"``/``"context"``, encoder
            repos) and ``remote_code`` (the repo ships its modelling code); see :func:`card_for_converted_checkpoint`.
        extra: Markdown appended as an extra section before the licence.

    Returns:
        A :class:`huggingface_hub.ModelCard`; ``card.save("README.md")`` or ``card.push_to_hub(repo_id)``.
    """
    if kind not in get_args(ModelKind):
        raise ValueError(f"`kind` must be one of {sorted(get_args(ModelKind))}, got {kind!r}.")
    base_models = [base_model] if isinstance(base_model, str) else list(base_model or [])
    if license != META_WEIGHTS_LICENSE and any(b.startswith(_META_BASE_PREFIXES) for b in base_models):
        raise ValueError(
            f"base_model {base_models} is an official Meta I-JEPA checkpoint (CC BY-NC 4.0); weights derived from "
            f"it must be published with license='{META_WEIGHTS_LICENSE}', not {license!r}."
        )
    results = [_eval_result(entry) for entry in eval_results or []]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification" if kind == "classifier" else "image-feature-extraction",
        license=license,
        tags=_unique([*BASE_TAGS, *(tags or [])]),
        datasets=[datasets] if isinstance(datasets, str) else (list(datasets) if datasets else None),
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        # model_name only matters as the model-index name; without results it would be stray YAML.
        model_name=model_name if results else None,
        eval_results=results or None,
    )
    custom_code = str(config_summary.get("model_type", "")).startswith("ijepa_hf")
    template_kwargs = dict(
        model_name=model_name,
        kind=kind,
        config_rows=[(k, _format_value(v)) for k, v in config_summary.items()],
        training_rows=_training_rows(training),
        results=[_result_row(r) for r in results],
        loading_code=(loading_code or default_loading_code(model_name, kind, custom_code)).rstrip("\n"),
        custom_code=custom_code,
        base_models=base_models,
        dataset_list=card_data.datasets or [],
        non_commercial=license == META_WEIGHTS_LICENSE,
        license=license,
        conversion=dict(conversion) if conversion else None,
        extra=(extra or "").strip(),
        citation=IJEPA_BIBTEX,
    )
    return ModelCard.from_template(
        card_data, template_str=MODEL_CARD_TEMPLATE_PATH.read_text(encoding="utf-8"), **template_kwargs
    )


def _training_rows(training: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    if not training:
        return []
    known = [k for k in _TRAINING_LABELS if k in training]
    other = [k for k in training if k not in _TRAINING_LABELS]
    return [
        (_TRAINING_LABELS.get(k, k.replace("_", " ").capitalize()), _format_value(training[k]))
        for k in (*known, *other)
    ]


def _result_row(result: EvalResult) -> dict[str, str]:
    return {
        "task": result.task_name or result.task_type,
        "dataset": result.dataset_name + (f" ({result.dataset_split})" if result.dataset_split else ""),
        "metric": result.metric_name or result.metric_type,
        "value": _format_value(result.metric_value),
    }


# ----------------------------------------------------------------------------------------------------------------
# Cards of converted official checkpoints (`ijepa-hf convert`)
# ----------------------------------------------------------------------------------------------------------------

def continue_pretraining_code(model_name: str) -> str:
    """A runnable sketch that resumes I-JEPA pretraining from a pretraining repo (masks, AdamW groups, EMA): the
    template's ``continue_pretraining_code`` macro."""
    return str(_template_macros().continue_pretraining_code(model_name)) + "\n"


def card_for_converted_checkpoint(
    model: Any,
    *,
    kind: ModelKind,
    release: str | None,
    source: str,
    release_info: Mapping[str, Any] | None = None,
    encoder: Literal["target", "context"] | None = None,
    model_name: str | None = None,
    remote_code: bool = False,
    num_heads_source: str | None = None,
) -> ModelCard:
    """The model card of a repo written by ``ijepa-hf convert`` from an official I-JEPA checkpoint.

    The licence is always CC BY-NC 4.0: official-format checkpoints are Meta's released weights (or weights
    trained with Meta's CC BY-NC code), and conversion does not change their licence.

    Args:
        model: The converted model (any ``ijepa_hf`` model or a stock transformers ``IJepaModel``); its config
            gives the architecture table.
        kind: ``"encoder"``, ``"pretraining"`` or ``"predictor"``.
        release: Official release name (``"IN1K-vit.h.14-300e"``...), or ``None`` for an unknown checkpoint.
        source: File name of the converted checkpoint.
        release_info: The release's entry of ``ijepa_hf.cli.OFFICIAL_RELEASES``: ``hub`` (the facebook/ repo,
            used as ``base_model``), ``dataset`` (Hub dataset id) and ``epochs``, all optional.
        encoder: For encoder repos, which encoder of the checkpoint was exported (``"target"`` or ``"context"``).
        model_name: The Hub repo id the card is for (used in the title and the loading code); a placeholder
            ``your-username/...`` name otherwise.
        remote_code: The repo ships its modelling code (``auto_map``), so it loads without ``ijepa_hf``.
        num_heads_source: Where the head count comes from (``"given with `--num-heads`"``, a release, the official
            table); the card states the count with it, since it is not stored in the weights.
    """
    info = dict(release_info or {})
    stem = release or source.removesuffix(".pth.tar").removesuffix(".pth")
    model_name = model_name or f"your-username/ijepa-{stem.lower()}-{kind}"
    summary = summarize_config(model)
    dataset = info.get("dataset")
    training: dict[str, Any] = {}
    if dataset:
        training["data"] = f"{dataset} train split (labels unused)"
    image_size = summary.get("image_size", summary.get("encoder.image_size"))
    if info and image_size is not None:
        training["image_size"] = image_size
    if info.get("epochs"):
        training["epochs"] = info["epochs"]
    if training:
        training["loss"] = "smooth L1 between predicted and layer-normalised target-encoder features"

    conversion = dict(
        source=source,
        release=release,
        num_heads=summary.get("num_attention_heads", summary.get("encoder.num_attention_heads")),
        num_heads_source=num_heads_source,
        encoder=encoder if kind == "encoder" else None,
        remote_code=remote_code,
    )
    return make_model_card(
        model_name=model_name,
        kind=kind,
        config_summary=summary,
        license=META_WEIGHTS_LICENSE,
        datasets=dataset,
        base_model=info.get("hub"),
        training=training or None,
        conversion=conversion,
    )


def _kind_of(model: Any) -> ModelKind:
    """The card kind of a model: classifier, pretraining, predictor, else encoder (ours or transformers' stock)."""
    names = {cls.__name__ for cls in type(model).__mro__}
    if hasattr(model, "target_encoder") and hasattr(model, "predictor"):
        return "pretraining"
    if any(name.endswith("ForImageClassification") for name in names):
        return "classifier"
    if "IJepaPredictorModel" in names:
        return "predictor"
    return "encoder"


def model_card_for(model: "PreTrainedModel", model_name: str, *, source: str | None = None, **card_kwargs: Any) -> ModelCard:
    """The default card of ``model`` for repo ``model_name``: its kind, architecture table, and the licence and base
    model of its weights (:func:`ijepa_hf.licensing.weights_license`: CC BY-NC 4.0 for anything derived from
    Meta's checkpoints). ``card_kwargs`` go to :func:`make_model_card` (``datasets``, ``training``, ...)."""
    info = weights_license(model, source=source)
    card_kwargs.setdefault("license", info.license)
    card_kwargs.setdefault("base_model", info.base_model if info.base_model != model_name else None)
    return make_model_card(model_name=model_name, kind=_kind_of(model), config_summary=summarize_config(model),
                           **card_kwargs)



def example_encoder_card() -> ModelCard:
    """The card rendered into ``model_cards/example_encoder_card.md`` (a ViT-H/14 encoder converted from
    Meta's IN-1k checkpoint). Regenerate the file with
    ``python -c "from ijepa_hf.cards import example_encoder_card as e; e().save('model_cards/example_encoder_card.md')"``.
    """
    return make_model_card(
        model_name="your-username/ijepa-vith14-1k-encoder",
        kind="encoder",
        config_summary={
            "model_type": "ijepa", "image_size": 224, "patch_size": 14, "hidden_size": 1280,
            "num_hidden_layers": 32, "num_attention_heads": 16, "intermediate_size": 5120,
        },
        license="cc-by-nc-4.0",
        datasets=["ILSVRC/imagenet-1k"],
        base_model="facebook/ijepa_vith14_1k",
        tags=["image-feature-extraction"],
        training={
            "data": "ImageNet-1k train (1.28M images, labels unused)",
            "image_size": 224,
            "augmentations": "RandomResizedCrop(scale=(0.3, 1.0)) + ImageNet normalisation",
            "epochs": 300,
            "batch_size": 2048,
            "masks": {"context_scale": (0.85, 1.0), "target_blocks": 4, "target_scale": (0.15, 0.2),
                      "target_aspect_ratio": (0.75, 1.5)},
            "optimizer": "AdamW",
            "lr_schedule": "linear warm-up 40 epochs from 2e-4 to 1e-3, cosine decay to 1e-6",
            "wd_schedule": "cosine 0.04 -> 0.4",
            "ema_schedule": "linear 0.996 -> 1.0",
            "loss": "smooth L1 between predicted and layer-normalised target features",
            "precision": "bfloat16",
        },
        eval_results=[
            {"task_name": "Linear probe", "dataset_name": "ImageNet-1k", "dataset_type": "ILSVRC/imagenet-1k",
             "dataset_split": "validation", "metric_type": "accuracy", "metric_name": "Top-1 accuracy (%)",
             "metric_value": 79.3, "source_name": "Assran et al. 2023, Table 1",
             "source_url": "https://arxiv.org/abs/2301.08243"},
        ],
        extra=(
            "## Conversion\n\nConverted with `ijepa_hf` from the `target_encoder` weights of the official "
            "`IN1K-vit.h.14-300e.pth.tar` checkpoint."
        ),
    )

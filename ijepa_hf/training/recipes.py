"""Training recipes: named settings that size the predictor relative to the encoder and set the warm-up as a fraction
of the run.

* ``official``: the paper's settings, unchanged (the config's predictor, a warm-up of 40 of 300 epochs, EMA
  0.996 -> 1.0).
* ``small``: for short runs on small data (a few thousand to a few hundred thousand updates, e.g. on one CPU or GPU).
  The official predictor (384 wide and 12 deep for ViT-H) is most of a small encoder's step; one block as wide as
  the encoder gives the encoder about twice the updates in the same time and learned better per minute in every
  pilot, and a longer warm-up (a quarter of the run) helped and a shorter one hurt. The recipe keeps the official
  EMA schedule: a faster one (0.99 -> 0.999) was within the noise on Fashion-MNIST, though the main job's scenes
  gained from it, so the embedded demo sets it itself. benchmarks/README.md has the runs.

A recipe fills what the user did not set: an explicit ``--warmup_ratio`` / ``--warmup_steps`` or a
``predictor.*`` field in ``--config_overrides`` wins over it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..configuration_ijepa_hf import IJepaPretrainingConfig

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_changes", "apply_recipe", "predictor_size_note"]


@dataclass(frozen=True)
class Recipe:
    """What a recipe sets. ``None``: left as the config / the arguments have it.

    Attributes:
        predictor_width_ratio: the predictor's ``hidden_size`` as a multiple of the encoder's.
        predictor_depth: the predictor's ``num_hidden_layers``.
        warmup_ratio: the learning-rate warm-up as a fraction of all updates.
        config_fields: top-level fields of the pretraining config, typed (e.g. ``{"sigreg_weight": 0.05}`` for an
            anti-collapse regulariser).
    """

    name: str
    predictor_width_ratio: float | None = None
    predictor_depth: int | None = None
    warmup_ratio: float = 40 / 300
    config_fields: Mapping[str, Any] = field(default_factory=dict)

    def predictor_fields(self, config: IJepaPretrainingConfig) -> dict[str, int]:
        """``{predictor field: value}`` this recipe gives a model of ``config``'s encoder."""
        fields: dict[str, int] = {}
        encoder = config.encoder_config
        if self.predictor_width_ratio is not None:
            heads = encoder.num_attention_heads  # the official predictor has the encoder's head count
            width = max(heads, round(encoder.hidden_size * self.predictor_width_ratio / heads) * heads)
            fields.update(hidden_size=width, num_attention_heads=heads, intermediate_size=int(width * encoder.intermediate_size / encoder.hidden_size))
        if self.predictor_depth is not None:
            fields["num_hidden_layers"] = self.predictor_depth
        return fields


RECIPES: dict[str, Recipe] = {
    "official": Recipe("official"),
    "small": Recipe("small", predictor_width_ratio=1.0, predictor_depth=1, warmup_ratio=0.25),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    return RECIPES[name]


def recipe_changes(config: IJepaPretrainingConfig, recipe: str | Recipe,
                   keep: Collection[str] = ()) -> dict[str, Any]:
    """What the recipe changes in a model of ``config``'s encoder, except the fields named in ``keep``
    (``"predictor.hidden_size"``, ``"sigreg_weight"``, ...: what the user set explicitly), as
    :meth:`IJepaPretrainingConfig.updated`'s keyword arguments, so that a caller can apply them in one update with
    changes of its own. Where the user sets the predictor's width, its MLP follows that width, not the recipe's."""
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    predictor = {name: value for name, value in recipe.predictor_fields(config).items()
                 if f"predictor.{name}" not in keep}
    if "predictor.hidden_size" in keep:
        predictor.pop("intermediate_size", None)  # `updated` derives it from the user's width
    fields = {name: value for name, value in recipe.config_fields.items() if name not in keep}
    return {"predictor": predictor, **fields}


def apply_recipe(config: IJepaPretrainingConfig, recipe: str | Recipe,
                 keep: Collection[str] = ()) -> IJepaPretrainingConfig:
    """A copy of ``config`` with the recipe's predictor settings and config fields, except the fields named in
    ``keep`` (:func:`recipe_changes`). Typed values throughout (:meth:`IJepaPretrainingConfig.updated`), so the
    config's validation runs on the result."""
    return config.updated(**recipe_changes(config, recipe, keep))


def _block_parameters(config: Any) -> int:
    """Weights of a config's transformer blocks (attention 4 x width^2, MLP 2 x width x intermediate, per block)."""
    width = config.hidden_size
    return config.num_hidden_layers * width * (4 * width + 2 * config.intermediate_size)


def predictor_size_note(config: IJepaPretrainingConfig) -> str | None:
    """A warning for a predictor with more block weights than the encoder, ``None`` otherwise. The official predictor
    (384 wide, 12 blocks) is a fraction of the ViT-B to ViT-H encoders it was made for, but it runs on every target
    block's sequence: under a small encoder it is most of each step, and the run is many times slower than one with
    the ``small`` recipe's predictor, with nothing said."""
    encoder, predictor = config.encoder_config, config.predictor_config
    ours, theirs = _block_parameters(predictor), _block_parameters(encoder)
    if ours <= theirs:
        return None
    return (
        f"The predictor ({predictor.hidden_size} wide, {predictor.num_hidden_layers} blocks: {ours / 1e6:.2f} M block "
        f"weights) is larger than the encoder ({encoder.hidden_size} wide, {encoder.num_hidden_layers} blocks: "
        f"{theirs / 1e6:.2f} M), and runs once per target block: it takes most of each step. The official predictor "
        "is sized for ViT-B and larger encoders; the 'small' recipe (--recipe small) gives one block as wide as the "
        "encoder, or set predictor.hidden_size / predictor.num_hidden_layers (--config_overrides)."
    )

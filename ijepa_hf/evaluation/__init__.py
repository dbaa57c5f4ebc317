"""Frozen-feature evaluation of I-JEPA encoders: feature extraction, linear probe, k-NN probe, results table.

The paper evaluates the **target encoder** with **average-pooled patch features** (I-JEPA has no [CLS] token;
maintainer in facebookresearch/ijepa#36) and releases no evaluation code. This module implements that protocol
and the common "last 4 layers" variant (DINO/iBOT-style: the outputs of the last four blocks, each passed
through the encoder's final LayerNorm, average-pooled over patches and concatenated).

All probes run in plain torch (no scikit-learn), are deterministic for a given ``seed`` and work on CPU or GPU:

* :func:`extract_features` -> ``(features [N, D] or [N, k*D], labels [N])``;
* :func:`linear_probe`: multinomial logistic regression on standardised features, L2 strength chosen on a
  held-out part of the training set, solved with full-batch L-BFGS (or mini-batch AdamW for very large sets);
* :func:`knn_probe`: cosine-similarity k-NN with the DINO temperature-weighted vote;
* :func:`attentive_probe`: a learned query cross-attending over the frozen patch tokens
  (``extract_features(..., pool=False)``), then a linear head (V-JEPA 2's attentive probe);
* :func:`evaluate_encoder`: both probes for one model and one layer choice, as a row of
  :func:`format_results_table`.

Accuracies are fractions in ``[0, 1]``; the table shows percentages. Modules, one concept each: ``features``
(extraction), ``probes`` (linear, k-NN, low-shot), ``attentive`` (the attentive probe), ``report`` (one-call
evaluation and the table).
"""

from .attentive import AttentiveClassifier, attentive_probe
from .features import extract_features
from .probes import DEFAULT_WEIGHT_DECAY_GRID, knn_probe, linear_probe, low_shot_indices, low_shot_linear_probe
from .report import evaluate_encoder, format_results_table

__all__ = [
    "DEFAULT_WEIGHT_DECAY_GRID",
    "extract_features",
    "linear_probe",
    "knn_probe",
    "AttentiveClassifier",
    "attentive_probe",
    "low_shot_indices",
    "low_shot_linear_probe",
    "evaluate_encoder",
    "format_results_table",
]

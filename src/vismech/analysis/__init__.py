"""Numbers from arrays: PCA, RSA, causal-mediation scoring and statistics.

Nothing here loads a model, renders an image or needs torch; every function takes numpy arrays (or array-likes)
and returns numbers or arrays. The experiments layer captures activations and logits and calls these.
"""

from .cma import head_significance, logit_diff, logit_diff_score, null_mean_scores, stage_map, top_k_heads
from .pca import StreamingMoments, chance_accuracy, pca, probe_accuracy, silhouette
from .rsa import (
    bootstrap_indices,
    cosine_rsm,
    feature_rsm,
    identity_rsm,
    layerwise_rsa,
    permutation_null,
    position_rsm,
    rsa_bootstrap,
    rsa_score,
    rsa_score_resampled,
)
from .stats import benjamini_hochberg, bootstrap_ci, empirical_pvalue, finite, holm, mean_se, paired_diff, rate, wilson_ci

__all__ = [
    # rsa
    "cosine_rsm",
    "position_rsm",
    "identity_rsm",
    "feature_rsm",
    "rsa_score",
    "rsa_score_resampled",
    "layerwise_rsa",
    "permutation_null",
    "bootstrap_indices",
    "rsa_bootstrap",
    # pca
    "pca",
    "StreamingMoments",
    "silhouette",
    "probe_accuracy",
    "chance_accuracy",
    # cma
    "logit_diff",
    "logit_diff_score",
    "null_mean_scores",
    "head_significance",
    "top_k_heads",
    "stage_map",
    # stats
    "mean_se",
    "bootstrap_ci",
    "wilson_ci",
    "empirical_pvalue",
    "benjamini_hochberg",
    "holm",
    "rate",
    "paired_diff",
    "finite",
]

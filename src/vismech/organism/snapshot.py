"""Analysis summaries of an organism during training: what the emergence figure plots besides accuracy.

``AnalysisSnapshot(...)(vlm, step)`` returns, for the model as it is at that step:

- ``rsa``: the three Fig. 1c curves (``experiments.rsa``: position at the comma tokens, position and features at
  the last token) on the 2x2 K x N x N high-entropy set, each as its peak value ``peak_r`` and ``peak_layer``
  (plain layer-wise RSA, no intervals: a snapshot is a point on a curve over training);
- ``cma``: for each of the paper's three conditions, the number of heads whose mean CMA score beats the
  re-paired-counterfactual null (Benjamini-Hochberg at ``q``; ``experiments.cma``), their mean layer (None when
  there are none), and the largest mean score.

``null_samples`` null means bound the smallest p-value at 1/(null_samples+1); 5000 lets a single head pass
Benjamini-Hochberg over the organism's 64 heads (it needs p <= q/64). The stimuli are drawn once (fixed seed), so
every snapshot of a run, and every seed's run, sees the same trials and pairs. The trainer adds the held-out
accuracies itself. Cost on the organism: one capture of ``rsa_k`` x 16 trials and 2 x 3 x L x H patched rows per
pair batch; a few seconds on a GPU.
"""

from __future__ import annotations

import numpy as np

from vismech.analysis.cma import head_significance, null_mean_scores
from vismech.analysis.rsa import layerwise_rsa
from vismech.engine import activations
from vismech.engine.mediation import condition_scores
from vismech.experiments import rsa as rsa_exp
from vismech.scenes.counterfactual import CONDITIONS, cma_pairs

#: (curve, token, target) of the three Fig. 1c curves, as ``experiments.rsa.CURVES`` names them.
RSA_CURVES = rsa_exp.CURVES[:3]


def _num(x):
    """``x`` rounded for the log, or None where it is undefined (None or not finite)."""
    if x is None or not np.isfinite(float(x)):
        return None
    return round(float(x), 4)


class AnalysisSnapshot:
    """Callable ``(vlm, step) -> dict`` with the RSA peaks and CMA head counts described in the module docstring."""

    def __init__(self, rsa_k: int = 3, cma_n: int = 16, grid=(2, 2), null_samples: int = 5000, q: float = 0.05,
                 seed: int = 0, batch_size: int = 16):
        self.grid, self.seed, self.q, self.batch_size = tuple(grid), seed, q, batch_size
        self.null_samples = null_samples
        self.trials = rsa_exp.rsa_trials(self.grid, rsa_k, "high", seed)
        self.pairs = {c: cma_pairs(c, cma_n, seed + (c == "feature_retrieval"), self.grid) for c in CONDITIONS}

    def rsa(self, vlm) -> dict:
        acts = activations.capture(vlm, self.trials, batch_size=self.batch_size)
        prompt = layerwise_rsa(acts.commas(), rsa_exp.prompt_targets(self.trials))
        last = layerwise_rsa(acts.last(), rsa_exp.last_targets(self.trials))
        out = {}
        for curve, token, target in RSA_CURVES:
            layer, value = rsa_exp.peak((prompt if token == "prompt" else last)[target])
            out[curve] = {"peak_r": _num(value), "peak_layer": layer}
        return out

    def cma(self, vlm) -> dict:
        out = {}
        for c, pairs in self.pairs.items():
            scores, null = condition_scores(vlm, pairs, c, self.batch_size, seed=self.seed)
            sig = head_significance(scores, null_mean_scores(null, self.null_samples, self.seed), q=self.q)
            layers = np.nonzero(sig["mask"])[0]
            mean = scores.mean(-1)
            out[c] = {"n_significant": int(sig["count"]),
                      "mean_layer": _num(layers.mean()) if layers.size else None,
                      "max_mean": _num(mean.max())}
        return out

    def __call__(self, vlm, step: int) -> dict:
        return {"rsa": self.rsa(vlm), "cma": self.cma(vlm)}

"""Attribution patching: a first-order screen of every head's causal-mediation score from one backward pass.

For a pair (c1, c2) and the metric m = logit[a1*] - logit[a1] at the last token of c1, patching head h's output
from c2 changes m by about (z_h(c2) - z_h(c1)) . dm/dz_h(c1), summed over the patched positions. One forward and
one backward on c1 give this for all heads at once (Nanda's attribution patching; Syed et al. 2023). It is an
approximation: use it to rank heads, then confirm the top of the ranking with exact patching (``patching``).
"""

from __future__ import annotations

import contextlib

import torch

from vismech.engine import hooks, replay
from vismech.models.vlm import VLM, Batch


@contextlib.contextmanager
def _frozen(model):
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def attribution_scores(vlm: VLM, clean: Batch, source_z: dict[int, torch.Tensor], positions: list[list[int]],
                       a1: torch.Tensor, a1_star: torch.Tensor, rows_per_pass: int = 8) -> torch.Tensor:
    """Estimated score of patching each head [L, H, B] (same sign convention as the exact CMA score).

    The backward pass holds every layer's activations, so pairs go through in groups of ``rows_per_pass``.
    """
    inp, _ = replay.lm_inputs(vlm, clean)
    B = len(clean)
    out = torch.empty(vlm.n_layers, vlm.n_heads, B)
    for a in range(0, B, rows_per_pass):
        b = min(B, a + rows_per_pass)
        src = {l: z[a:b] for l, z in source_z.items()}
        out[:, :, a:b] = _attribution(vlm, inp.rows_slice(a, b), src, positions[a:b], a1[a:b], a1_star[a:b])
    return out


def _attribution(vlm, inp, source_z, positions, a1, a1_star) -> torch.Tensor:
    B = inp.rows
    pos = torch.tensor(positions, dtype=torch.long)
    live: dict[int, torch.Tensor] = {}

    def keep(layer):
        def fn(x):
            y = x.clone()  # a node on the path to the output, so its gradient is kept
            y.retain_grad()
            live[layer] = y
            return y
        return fn

    with _frozen(vlm.model), torch.enable_grad(), contextlib.ExitStack() as stack:
        emb = inp.tensors["inputs_embeds"].detach().clone().requires_grad_(True)
        tensors = {**inp.tensors, "inputs_embeds": emb}
        for layer in range(vlm.n_layers):
            stack.enter_context(hooks.hooked(vlm, "z", layer, keep(layer)))
        lm = hooks.language_model(vlm)
        out = lm(**tensors, use_cache=False)
        logits = replay.output_logits(vlm, out)
        dev = logits.device
        rows = torch.arange(B, device=dev)
        metric = logits[rows, a1_star.to(dev)] - logits[rows, a1.to(dev)]
        metric.sum().backward()
    scores = torch.empty(vlm.n_layers, vlm.n_heads, B)
    for layer in range(vlm.n_layers):
        z, g = live[layer], live[layer].grad
        idx = pos.to(z.device)
        r = torch.arange(B, device=z.device)[:, None]
        z_c, g_c = z.detach()[r, idx].float(), g[r, idx].float()  # [B, P, H, D]
        delta = source_z[layer].to(z.device).float() - z_c
        scores[layer] = (delta * g_c).sum(dim=(1, 3)).T.cpu()
    return scores

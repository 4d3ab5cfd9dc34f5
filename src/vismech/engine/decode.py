"""Greedy generation from the language model's captured inputs: many settings of one batch, one vision pass.

``VLM.generate_ids`` (HF ``generate``) runs the whole model, vision tower included, on every row it is given; an
experiment that generates under many settings (counting-ablation's head sets, stacked as row blocks) repeats the
same images once per setting. Here the batch's language-model inputs are captured once
(``replay.lm_inputs``), stacked ``r`` times (``LMInputs.repeat``), and decoded greedily with a KV cache by the
text backbone alone. Whatever hooks are active run at every step, the prompt's forward and each new token's.

Each step feeds the new tokens' embeddings (the model's input embeddings), the 2-D attention mask grown by one
column, and the next positions: the last prompt position plus the step on every position axis where the prompt's
positions were given (M-RoPE's axes all continue from the last, text, position), else none, as the backbone
numbers a cached run itself. Rows stop at an end token (the generation config's) and are padded after it; all
stop together when every row has stopped, as ``generate`` does. ``greedy`` equals ``VLM.generate_ids`` on every
family (tested); ``replays`` checks, once per model, that the captured inputs are complete (callers fall back to
``generate`` where they are not).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from vismech.engine import hooks, replay
from vismech.engine.replay import LMInputs, cache_kwarg
from vismech.errors import UserError


def replays(vlm, batch) -> bool:
    """Whether the text backbone, run alone on ``batch``'s captured inputs, gives the full forward's logits
    (``replay.check_replay``; checked on the first batch a model is given, then remembered): where it does not
    (a family whose language model takes an input the capture misses), callers generate with HF ``generate``."""
    if getattr(vlm, "_replays", None) is None:
        inp, full = replay.lm_inputs(vlm, batch)
        try:
            with replay.replay_errors(vlm):
                replay.check_replay(vlm, full, replay.lm_logits(vlm, inp))
            vlm._replays = True
        except UserError:
            vlm._replays = False
    return vlm._replays


def end_tokens(vlm) -> list[int]:
    """The tokens that end a row's generation (the generation config's end tokens, else the tokenizer's)."""
    eos = getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = vlm.tokenizer.eos_token_id
    return [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


class Greedy(NamedTuple):
    """The prompt's last-token logits [rows, vocab] (float32; the same forward's, so under the same hooks) and the
    greedy continuation [rows, <= max_new_tokens]."""

    logits: torch.Tensor
    ids: torch.Tensor


@torch.no_grad()
def greedy(vlm, inp: LMInputs, attention_mask: torch.Tensor, max_new_tokens: int) -> Greedy:
    """Greedy continuation of the language-model inputs ``inp`` (``rows`` rows; the 2-D ``attention_mask`` [rows,
    length] of their tokens), as ``VLM.generate_ids`` gives it, with the prompt's last-token logits."""
    from transformers import DynamicCache

    lm = hooks.language_model(vlm)
    embed = vlm.model.get_input_embeddings()
    cache = DynamicCache()
    kw = cache_kwarg(lm)
    first = replay.output_logits(vlm, lm(**inp.tensors, use_cache=True, **{kw: cache}))
    tok = first.argmax(-1)
    dev = tok.device
    pos = inp.tensors.get("position_ids")
    last = None if pos is None else pos[..., -1:]
    mask = attention_mask.to(dev)
    ends = torch.tensor(end_tokens(vlm), device=dev)
    pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else (int(ends[0]) if len(ends) else 0)
    done = torch.zeros(len(tok), dtype=torch.bool, device=dev)
    new = []
    for step in range(1, max_new_tokens + 1):
        tok = torch.where(done, pad, tok)
        new.append(tok)
        done |= torch.isin(tok, ends)
        if step == max_new_tokens or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step_kw = {"inputs_embeds": embed(tok[:, None]), "attention_mask": mask, "use_cache": True, kw: cache}
        if last is not None:
            step_kw["position_ids"] = last + step
        tok = replay.output_logits(vlm, lm(**step_kw)).argmax(-1)
    return Greedy(first, torch.stack(new, 1))

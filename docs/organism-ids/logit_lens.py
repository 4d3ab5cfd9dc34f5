"""Logit lens at the position that predicts the answer's first word (its colour), 3x3 scenes with OBJECTS objects and
all but one described (64 trials): per layer, how often the arg-max of the final norm and head applied to the
residual stream is the target's colour, and how often the first described object's; then the last layer's heads, or
its MLP, replaced by their mean over the trials. Runs on the CPU.

    PYTHONPATH=src python docs/organism-ids/logit_lens.py MODEL [OBJECTS]
"""
import contextlib
import sys

import torch

sys.path.insert(0, "docs/organism-ids")
from selection_attention import _trials
from vismech.engine import hooks
from vismech.models.load import load_vlm
from vismech.organism import plant, plant_batch as pb, validate

vlm = load_vlm(sys.argv[1], dtype="fp32", device="cpu")
spec = validate.spec_of(vlm)
objects = int(sys.argv[2]) if len(sys.argv) > 2 else 2
trials = _trials(64, (3, 3), objects)
b = pb.batch_of(vlm, spec, validate._plan(trials), validate.END.get(vlm.family.name, "<|im_end|>"))
inputs = plant._inputs(b, "a_")
labels = b["a_labels"]
first = (labels != -100).int().argmax(-1)  # the first labelled token (the answer's colour word)
pos = first - 1
want = labels[torch.arange(len(labels)), first]
tok = vlm.tokenizer
# the first described object's colour word, as the answer would begin with it
desc = torch.tensor([tok.convert_tokens_to_ids(tok.tokenize(" " + t.mentioned[0].color)[0]) for t in trials])
norm, last = hooks.language_model(vlm).norm, vlm.n_layers - 1
rows = torch.arange(len(labels))
resid = {}
with torch.no_grad():
    with contextlib.ExitStack() as st:
        for layer in range(vlm.n_layers):
            st.enter_context(hooks.hooked(vlm, "resid", layer, lambda x, layer=layer: resid.__setitem__(layer, x)))
        logits = vlm.model(**inputs, use_cache=False).logits
    print(f"{sys.argv[1]}: final first-word accuracy {(logits[rows, pos].argmax(-1) == want).float().mean():.2f}, "
          f"names the described colour {(logits[rows, pos].argmax(-1) == desc).float().mean():.2f}")
    for layer in range(vlm.n_layers):
        x = resid[layer][rows, pos, 0] if resid[layer].dim() == 4 else resid[layer][rows, pos]
        pred = vlm.model.lm_head(norm(x)).argmax(-1)
        print(f"after layer {layer}: target colour {(pred == want).float().mean():.2f}, described colour "
              f"{(pred == desc).float().mean():.2f}")



def run(ctx):
    """First-word and full-answer accuracy, and how often the described colour comes first, within ``ctx``."""
    with torch.no_grad(), ctx:
        lg = vlm.model(**inputs, use_cache=False).logits
    p = lg[rows, pos].argmax(-1)
    full = plant.answer_hits(lg, labels).float().mean()
    return (f"first word {(p == want).float().mean():.2f}, described {(p == desc).float().mean():.2f}, "
            f"full answer {full:.2f}")


# the last layer: every head's output replaced by its mean over the trials, or the MLP's output
mean = lambda z: z.mean(0, keepdim=True).expand_as(z)  # noqa: E731
print("heads of the last layer mean-ablated:", run(hooks.hooked(vlm, "z", last, mean)))
print("MLP of the last layer mean-ablated:", run(hooks.hooked(vlm, "mlp", last, mean)))

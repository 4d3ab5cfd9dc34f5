"""``vismech inspect MODEL``: check how vismech frames and scores a checkpoint before a long run.

For one trial of each of the paper's tasks it shows the framed prompt (the image run written as
``<token> x n``), the tokens around the image run, the positions vismech patches (mentions, commas, last token,
each object's image tokens) decoded, the answer's tokens in every form with the task's scoring rule
(``models.answers``), and the chat-vs-plain baseline accuracy on ``n`` trials per task, which decides the default
prompt format of a real checkpoint (``models.load``). ``inspect`` returns the same as a dict for ``--out``.
"""

from __future__ import annotations

from vismech.models.answers import format_accuracy
from vismech.scenes.stimuli import generate
from vismech.scenes.tasks import TASKS


def _pieces(tok, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def _collapsed(text: str, token: str) -> str:
    """``text`` with each run of ``token`` written as ``token x n``."""
    out, i = [], 0
    while True:
        j = text.find(token, i)
        if j < 0:
            return "".join(out) + text[i:]
        k = j
        while text.startswith(token, k):
            k += len(token)
        out += [text[i:j], f"{token} x {(k - j) // len(token)}"]
        i = k


def inspect(vlm, n: int = 8, seed: int = 0) -> dict:
    """Framing, positions, answer tokens and chat-vs-plain accuracy of ``vlm`` (see the module docstring)."""
    tok, fam = vlm.tokenizer, vlm.family
    rec = {"model": vlm.name, "family": fam.name, **vlm.framing_record(seed), "tasks": {}}
    for task in TASKS:
        t = generate(task, None, 1, seed)[0]
        b = vlm.encode([t])
        ids = b.inputs["input_ids"][0].tolist()
        run = b.image_tokens[0]
        aset = vlm.answers(b, [[t.answer]])
        rec["tasks"][task] = {
            "framed": _collapsed(b.texts[0], fam.image_token),
            "before_image": _pieces(tok, ids[max(0, run[0] - 6):run[0]]),
            "image_tokens": len(run),
            "after_image": _pieces(tok, ids[run[-1] + 1:run[-1] + 9]),
            "mentions": [_pieces(tok, [ids[p] for p in m]) for m in b.mentions[0]],
            "commas": [tok.decode([ids[p]]) for p in b.commas[0]],
            "last": tok.decode([ids[b.last]]),
            "objects": {f"{o.name} {o.cell}": len(b.objects[0].get(o.cell, [])) for o in t.scene.objects}
            if fam.spatial_tokens else "no per-patch image tokens",
            "answer": t.answer,
            "answer_tokens": [_pieces(tok, s) for s in aset.seqs[0][0]],
            "rule": aset.rule,
        }
    acc = format_accuracy(vlm, n, seed)
    rec["baseline_accuracy"] = {"n_per_task": n, **acc}
    rec["default_prompt_format"] = "chat" if vlm.framing.vismech or acc["chat"] >= acc["plain"] else "plain"
    rec["default_chosen_by"] = ("vismech's own model: the form it was built and trained with" if vlm.framing.vismech
                                else "first-answer accuracy (chat on a tie)")
    return rec


def report(rec: dict) -> str:
    """``inspect``'s result as text."""
    lines = [f"{rec['model']} ({rec['family']}): chat template from {rec['template_source']}; articles "
             f"{rec['articles']!r}; shown in {rec['prompt_format']} form", ""]
    for task, r in rec["tasks"].items():
        lines += [f"== {task} ==", r["framed"], "",
                  f"  around the image run ({r['image_tokens']} tokens): {r['before_image']} ... {r['after_image']}",
                  f"  mentions {r['mentions']}  commas {r['commas']}  last {r['last']!r}",
                  f"  object image tokens {r['objects']}",
                  f"  answer {r['answer']!r}: scored by {r['rule']} on {r['answer_tokens']}", ""]
    acc = rec["baseline_accuracy"]
    lines.append(f"baseline accuracy ({acc['n_per_task']} trials per task): chat {acc['chat']:.3f}, plain "
                 f"{acc['plain']:.3f} -> default prompt format: {rec['default_prompt_format']} "
                 f"({rec['default_chosen_by']})")
    return "\n".join(lines)

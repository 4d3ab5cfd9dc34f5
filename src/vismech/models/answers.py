"""Answers as the model would write them, and how they are scored.

**What is scored.** The answer's word(s) a task asks for, continuing the framed text the way the model writes them:

- the unit: the whole answer for colour retrieval, spatial relation and counting (a colour word, a number); the
  first word of the answer for scene description (the target's colour, the word that follows the prompt's
  "and a", as in the paper's first-token score; the shape after it is not scored);
- the leading space follows the framing: none after a text that ends in whitespace (Qwen's "assistant\\n"), one
  otherwise ("ASSISTANT:", "Answer:", "... and a");
- casing: an answer that opens a reply (question tasks) is scored in the forms a model writes, ``blue`` and
  ``Blue``; their probabilities are added (log-sum-exp of the two sequence log-probabilities), so the score is the
  probability of the answer whichever case the model uses. A completion continues the sentence: lower case only.

**How it is scored** (the rule, per task and model, ``answer_rule``, recorded in every run's manifest):

- ``first_token`` where it is exact: every form of every answer the task can have (all colours, or the numbers
  0-20) is a single token with this tokenizer and framing, and no two answers share it. The score of an answer is
  then the last-token logit of its token (log-sum-exp over its forms), which differs from its log-probability
  by the same constant for every answer of a row; differences between answers, all vismech uses, are exact.
  vismech's word-level models are always here, so their results are unchanged;
- ``sequence`` otherwise (multi-token words such as Llama's "▁p"+"ink", numbers split into digits or a bare
  space token, shared first tokens): the teacher-forced log-probability of the answer's whole token sequence,
  summed over its tokens, each form run as its own row (the prompt row with the answer's tokens but the last
  appended on the right, so every prompt position keeps its index, and patches, caches and hooks stay valid).

Accuracy ("greedy", ``AnswerScores.greedy``): every token of some form of the answer is the arg-max of the
vocabulary at its position (teacher forced); with ``first_token`` that is the usual first-token accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vismech.scenes.tasks import COUNTING, QUESTION_TASKS, SCENE_DESCRIPTION
from vismech.scenes.vocab import COLORS

from .framing import tokenize

#: The answers a task can have (what decides its rule).
TASK_ANSWERS = {COUNTING: tuple(str(i) for i in range(21))}


def scored_text(task: str, answer: str) -> str:
    """The part of ``answer`` that is scored (the first word for scene description)."""
    return answer.split()[0] if task == SCENE_DESCRIPTION else answer


def forms(task: str, text: str) -> list[str]:
    """The forms a model writes ``text`` in: as is, and capitalised when it opens a reply (question tasks)."""
    out = [text]
    if task in QUESTION_TASKS and text[:1].islower():
        out.append(text[0].upper() + text[1:])
    return out


def continuation(tokenizer, text: str, answer: str, prefix: list[int] | None = None) -> list[int]:
    """The tokens of ``answer`` written after ``text`` (a space first unless ``text`` ends in whitespace)."""
    sep = "" if (not text or text[-1].isspace()) else " "
    prefix = tokenize(tokenizer, text)["input_ids"] if prefix is None else prefix
    full = tokenize(tokenizer, text + sep + answer)["input_ids"]
    if full[:len(prefix)] != list(prefix) or len(full) == len(prefix):
        raise ValueError(f"the answer {answer!r} does not continue the prompt's tokens with this tokenizer (it merges "
                         "with the prompt's last token), so it cannot be scored as a continuation")
    return full[len(prefix):]


def decide_rule(tokenizer, task: str, text: str) -> str:
    """``first_token`` if every form of every answer of ``task`` is one token after ``text`` and no two answers
    share it, else ``sequence``."""
    words = TASK_ANSWERS.get(task, tuple(COLORS))
    prefix = tokenize(tokenizer, text)["input_ids"]
    owner: dict[int, str] = {}
    for w in words:
        for f in forms(task, w):
            ids = continuation(tokenizer, text, f, prefix)
            if len(ids) != 1 or owner.setdefault(ids[0], w) != w:
                return "sequence"
    return "first_token"


@dataclass
class AnswerScores:
    """Scores [B, K] (log-probabilities, or logits under ``first_token``) and greedy hits [B, K] of K answers (None
    where only the answers' own logits were computed: ``AnswerSet.reduce(vocab=...)``)."""

    scores: torch.Tensor
    greedy: torch.Tensor | None


@dataclass
class AnswerSet:
    """K candidate answers per batch row, as token sequences in every form, with the rule that scores them.

    ``seqs[b][k]`` lists the token sequences of the forms of candidate k of row b. Under ``sequence``, ``rows``
    are the scoring rows: (batch row, tokens appended), one per distinct (row, sequence minus its last token), and
    ``where[b][k][f]`` is the scoring row of form f."""

    rule: str
    seqs: list[list[list[list[int]]]]
    rows: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)
    where: list[list[list[int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.rule == "sequence" and not self.rows:
            index: dict[tuple[int, tuple[int, ...]], int] = {}
            self.where = [[[index.setdefault((b, tuple(s[:-1])), len(index)) for s in cand] for cand in row]
                          for b, row in enumerate(self.seqs)]
            self.rows = list(index)

    @property
    def k(self) -> int:
        return len(self.seqs[0])

    @property
    def tail(self) -> int:
        """How many last positions' logits scoring needs (1 under ``first_token``)."""
        return 1 if self.rule == "first_token" else max(len(s) for row in self.seqs for c in row for s in c)

    @property
    def row_source(self) -> list[int]:
        """For every scoring row, the batch row it continues (the identity under ``first_token``)."""
        return list(range(len(self.seqs))) if self.rule == "first_token" else [b for b, _ in self.rows]

    def check_distinct(self, names: list[list[str]]) -> None:
        """A clear error where two candidates of a row cannot be told apart by this rule."""
        for b, row in enumerate(self.seqs):
            keys = [{s[0] for s in c} if self.rule == "first_token" else {tuple(s) for s in c} for c in row]
            for i in range(len(row)):
                for j in range(i + 1, len(row)):
                    if keys[i] & keys[j]:
                        what = "begin with the same token" if self.rule == "first_token" else "share a form"
                        raise ValueError(f"answers {names[b][i]!r} and {names[b][j]!r} {what} for this tokenizer, so "
                                         "their scores cannot tell them apart; choose stimuli whose answers differ "
                                         "in their first word")

    def greedy_from(self, continuation: torch.Tensor, max_new_tokens: int) -> torch.Tensor | None:
        """Greedy hits [B, K] read off each row's greedy continuation of up to ``max_new_tokens`` tokens
        (``VLM.generate_ids``), without a scoring forward: a form's tokens are each the arg-max at their position,
        teacher forced, exactly when the greedy continuation begins with them (by induction over the tokens: while
        they agree, the model has read the same text; a row that ended first wrote its end token instead). None
        where ``max_new_tokens`` is shorter than some form (teacher forcing is then needed)."""
        if max_new_tokens < self.tail:
            return None
        gen = continuation.tolist()
        return torch.tensor([[any(g[:len(s)] == s for s in cand) for cand in row]
                             for g, row in zip(gen, self.seqs)], dtype=torch.bool)

    # -- the scoring rows --------------------------------------------------------------------------------------
    def expand(self, vlm, batch):
        """The batch whose rows are the scoring rows (the batch itself under ``first_token``)."""
        if self.rule == "first_token":
            return batch
        src = self.row_source
        width = self.tail - 1
        ids = batch.inputs["input_ids"][src]
        mask = batch.inputs["attention_mask"][src]
        pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else 0
        extra = torch.full((len(src), width), pad, dtype=ids.dtype)
        more = torch.zeros((len(src), width), dtype=mask.dtype)
        for r, (_, toks) in enumerate(self.rows):
            extra[r, :len(toks)] = torch.tensor(toks, dtype=ids.dtype)
            more[r, :len(toks)] = 1
        out = batch.take(src)
        out.inputs["input_ids"] = torch.cat([ids, extra], 1)
        out.inputs["attention_mask"] = torch.cat([mask, more], 1)
        out.inputs.update(vlm.family.extra_inputs(out.inputs["input_ids"], vlm.image_token_id))
        return out

    def _index(self, device) -> tuple[torch.Tensor, ...]:
        """Gather indices of every (row, candidate, form): scoring row [N], token ids [N, L] and their validity,
        the (row * K + candidate) each belongs to and its form's slot [N]; built once, cached per device."""
        cache = self.__dict__.setdefault("_indices", {})
        if device not in cache:
            rows, toks, owner, slot = [], [], [], []
            for b, row in enumerate(self.seqs):
                for c, cand in enumerate(row):
                    for f, seq in enumerate(cand):
                        rows.append(b if self.rule == "first_token" else self.where[b][c][f])
                        toks.append(list(seq))
                        owner.append(b * self.k + c)
                        slot.append(f)
            width = max(len(t) for t in toks)
            tok = torch.tensor([t + [0] * (width - len(t)) for t in toks])
            valid = torch.tensor([[i < len(t) for i in range(width)] for t in toks])
            cache[device] = tuple(x.to(device) for x in (torch.tensor(rows), tok, valid, torch.tensor(owner),
                                                          torch.tensor(slot)))
        return cache[device]

    def vocab(self) -> torch.Tensor | None:
        """The token ids scoring reads (sorted), where they are all it needs: under ``first_token`` the answers'
        first tokens (a patched run then needs only those logits: ``reduce(..., vocab)``); None under
        ``sequence``, whose log-probabilities need the whole vocabulary."""
        if self.rule != "first_token":
            return None
        return torch.tensor(sorted({s[0] for row in self.seqs for c in row for s in c}), dtype=torch.long)

    def reduce(self, logits: torch.Tensor, vocab: torch.Tensor | None = None) -> AnswerScores:
        """Scores and greedy hits [B, K] from the scoring rows' logits: [rows, vocab] (the last position) or
        [rows, tail, vocab] (the last ``tail`` positions). A candidate's score is the log-sum-exp over its forms of
        the form's summed token scores; it is a greedy hit when every token of one of its forms is the arg-max.
        One gather for the whole batch (no per-row work on the host). With ``vocab`` (``self.vocab()``) the logits
        are those of these token ids only, [rows, len(vocab)]: the scores are the same, and the greedy hits, which
        need every logit, are None."""
        if logits.dim() == 2:
            logits = logits[:, None]
        logits = logits.float()
        logp = logits if self.rule == "first_token" else torch.log_softmax(logits, -1)
        rows, tok, valid, owner, slot = self._index(logits.device)
        if vocab is not None:
            if self.rule != "first_token":
                raise ValueError("only first-token scoring reads a part of the vocabulary")
            tok = torch.searchsorted(vocab.to(logits.device), tok).clamp(max=logits.shape[-1] - 1)
        at = torch.arange(tok.shape[1], device=logits.device).expand_as(tok)
        r = rows[:, None].expand_as(tok)
        vals = torch.where(valid, logp[r, at.clamp(max=logp.shape[1] - 1), tok], 0.0).sum(-1)
        B, K = len(self.seqs), self.k
        per = torch.full((B * K, int(slot.max()) + 1), float("-inf"), device=logits.device)
        per[owner, slot] = vals
        scores = torch.where(torch.isinf(per[:, 1:]).all(-1), per[:, 0], torch.logsumexp(per, -1))
        if vocab is not None:
            return AnswerScores(scores.view(B, K).cpu(), None)
        top = logits.argmax(-1)
        hits = ((top[r, at.clamp(max=top.shape[1] - 1)] == tok) | ~valid).all(-1)
        got = torch.zeros(B * K, dtype=torch.int8, device=logits.device).scatter_reduce(0, owner, hits.to(torch.int8),
                                                                                         "amax")
        return AnswerScores(scores.view(B, K).cpu(), got.view(B, K).bool().cpu())


def select_rows(inputs: dict[str, torch.Tensor], rows: list[int], image_tokens: list[int] | None = None
                ) -> dict[str, torch.Tensor]:
    """Model inputs of the given batch rows (repeats allowed), image tensors included (Qwen's flattened patches
    are regrouped by ``image_grid_thw``; pixel values packed over the batch's images with no per-row count, as
    tiles are, are regrouped in proportion to each row's number of ``image_tokens``)."""
    idx = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, v in inputs.items():
        counts = None
        if key == "pixel_values" and "image_grid_thw" in inputs:
            counts = inputs["image_grid_thw"].prod(-1).tolist()
        elif key == "pixel_values" and image_tokens is not None and v.shape[0] != len(image_tokens):
            counts = [n * v.shape[0] // sum(image_tokens) for n in image_tokens]
        if counts is None:
            out[key] = v[idx]
            continue
        starts = [sum(counts[:i]) for i in range(len(counts))]
        out[key] = torch.cat([v[starts[r]:starts[r] + counts[r]] for r in rows])
    return out


def answer_set(vlm, batch, candidates: list[list[str]]) -> AnswerSet:
    """The AnswerSet of ``candidates[b]`` (answer strings, K per row) for every row of ``batch``."""
    if len(candidates) != len(batch) or len({len(c) for c in candidates}) != 1:
        raise ValueError("give the same number of candidate answers for every row of the batch")
    tasks = {t.task for t in batch.trials}
    rules = {vlm.answer_rule(task, batch.texts[next(i for i, t in enumerate(batch.trials) if t.task == task)])
             for task in tasks}
    rule = "sequence" if "sequence" in rules else "first_token"
    seqs = []
    for b, (t, text) in enumerate(zip(batch.trials, batch.texts)):
        prompt = batch.inputs["input_ids"][b, batch.inputs["attention_mask"][b].bool()].tolist()
        row = []
        for ans in candidates[b]:
            cand = []
            for f in forms(t.task, scored_text(t.task, ans)):
                s = continuation(vlm.tokenizer, text, f, prompt)
                if s not in cand:
                    cand.append(s)
            row.append([s[:1] for s in cand] if rule == "first_token" else cand)
        if rule == "first_token":  # forms that share their first token are one form
            row = [[list(x) for x in dict.fromkeys(tuple(s) for s in c)] for c in row]
        seqs.append(row)
    return AnswerSet(rule, seqs)


@torch.no_grad()
def score(vlm, batch, aset: AnswerSet) -> AnswerScores:
    """Score ``aset`` on the unedited model (one forward of the batch, or of its scoring rows)."""
    if aset.rule == "first_token":
        return aset.reduce(vlm.logits(batch))
    return aset.reduce(vlm.logits(aset.expand(vlm, batch), aset.tail))


def format_accuracy(vlm, n: int = 8, seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """Greedy answer accuracy of ``vlm`` in chat and plain form on ``n`` trials of each of the paper's tasks
    (fixed draws); ``vlm.prompt_format`` is left as it was."""
    from vismech.scenes.stimuli import generate
    from vismech.scenes.tasks import TASKS

    trials = [t for task in TASKS for t in generate(task, None, n, seed)]
    keep, acc = vlm.prompt_format, {}
    try:
        for fmt in ("chat", "plain"):
            vlm.prompt_format = fmt
            hits = 0
            for s in range(0, len(trials), batch_size):
                chunk = [t for t in trials[s:s + batch_size]]
                for task in {t.task for t in chunk}:
                    part = [t for t in chunk if t.task == task]
                    b = vlm.encode(part)
                    hits += int(score(vlm, b, answer_set(vlm, b, [[t.answer] for t in part])).greedy[:, 0].sum())
            acc[fmt] = hits / len(trials)
    finally:
        vlm.prompt_format = keep
    return acc

"""Answers scored as the model would write them (``models.answers``): the teacher-forced sequence score equals a
hand computation, the fast patching engine equals the naive one with it on every tiny family, first-token scoring
is unchanged where it is exact, and on the real Qwen and Llama vocabularies counts and split words are scored by
their whole token sequences (where the old first-token ids were a bare space or a shared prefix)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny, two_object_trials
from vismech.engine import patching, replay
from vismech.models.answers import AnswerSet, continuation
from vismech.scenes.counterfactual import cma_pairs


def forced(vlm, b, cands: list[list[list[str]]]) -> AnswerSet:
    """A ``sequence`` AnswerSet from explicit forms (strings) per row and candidate."""
    seqs = []
    for r, row in enumerate(cands):
        prompt = b.inputs["input_ids"][r, b.inputs["attention_mask"][r].bool()].tolist()
        seqs.append([[continuation(vlm.tokenizer, b.texts[r], f, prompt) for f in forms] for forms in row])
    return AnswerSet("sequence", seqs)


def by_hand(vlm, b, row: int, tokens: list[int]) -> float:
    """log P(tokens | row's prompt), one unpadded forward of prompt + tokens."""
    keep = b.inputs["attention_mask"][row].bool()
    ids = torch.cat([b.inputs["input_ids"][row, keep], torch.tensor(tokens)])[None]
    single = vlm.encode([b.trials[row]])
    inputs = {k: v for k, v in single.inputs.items()}
    inputs["input_ids"], inputs["attention_mask"] = ids, torch.ones_like(ids)
    inputs.update(vlm.family.extra_inputs(ids, vlm.image_token_id))
    with torch.no_grad():
        logits = vlm.model(**inputs, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits[-len(tokens) - 1:-1], -1)
    return float(logp[torch.arange(len(tokens)), torch.tensor(tokens)].sum())


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_scores_are_teacher_forced_log_probabilities(family):
    vlm = tiny(family)
    trials = two_object_trials()
    b = vlm.encode(trials)
    cands = [[["blue circle", "blue"], ["red square"]], [["blue heart"], ["green triangle", "green"]]]
    aset = forced(vlm, b, cands)
    got = vlm.score_answers(b, aset)
    for r in range(2):
        for c in range(2):
            parts = [by_hand(vlm, b, r, s) for s in aset.seqs[r][c]]
            want = float(torch.logsumexp(torch.tensor(parts), 0))
            assert abs(float(got.scores[r, c]) - want) < 1e-4, (family, r, c)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_engine_equals_naive_with_sequence_scores(family):
    vlm = tiny(family)
    pairs = cma_pairs("id_retrieval", 3, 0)
    clean = vlm.encode([p.clean for p in pairs])
    cf = vlm.encode([p.counterfactual for p in pairs])
    aset = forced(vlm, clean, [[[p.answer, p.answer.split()[0]], [p.answer_star]] for p in pairs])
    heads = [(0, 0), (1, 2), (2, 3), (2, 1)]
    for pos in ([list(m[0]) for m in clean.mentions], [[clean.last]] * len(pairs)):
        width = max(len(p) for p in pos)
        pos = [p + [p[-1]] * (width - len(p)) for p in pos]
        src = patching.capture_z(vlm, cf, pos)
        fast = patching.head_patch(vlm, clean, src, pos, aset, heads=heads, rows_per_forward=3)
        naive = patching.naive_head_patch(vlm, clean, src, pos, aset, heads=heads)
        assert fast.shape == (4, 3, 2)
        assert (fast - naive).abs().max() < 1e-4, family
        # the no-op patch leaves the clean scores
        zero = patching.head_patch(vlm, clean, src, pos, aset, heads=[(0, 0)], mode="add", scale=0.0)[0]
        assert (zero - vlm.score_answers(clean, aset).scores).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_first_token_rule_is_exact_on_word_level_models(family):
    vlm = tiny(family)
    b = vlm.encode(two_object_trials())
    aset = vlm.answers(b, [[t.answer, "green star"] for t in b.trials])
    assert aset.rule == "first_token" and aset.tail == 1
    logits = vlm.logits(b)
    ids = torch.stack([vlm.answer_ids(b, [t.answer for t in b.trials]), vlm.answer_ids(b, ["green"] * 2)], 1)
    got = vlm.score_answers(b, aset)
    assert torch.equal(got.scores, logits.gather(1, ids))
    assert torch.equal(got.greedy, logits.argmax(-1, keepdim=True) == ids)


# -- real vocabularies ------------------------------------------------------------------------------------------
def _real(family):
    from test_real_tokenizers import checkpoint, trials

    return checkpoint(family)[2], trials()


def test_counts_on_llama_are_sequences_not_the_space_token():
    vlm, ts = _real("llava")
    count = ts[3]
    b = vlm.encode([count, count])
    old = vlm.answer_ids(b, ["3", "4"])  # the first token the old rule scored: a bare space for every count
    assert old.tolist() == [29871, 29871]
    aset = vlm.answers(b, [["3", "12"], ["4", "5"]])
    assert aset.rule == "sequence"
    tok = vlm.tokenizer
    assert [tok.convert_ids_to_tokens(s) for s in aset.seqs[0][0]] == [["\u2581", "3"]]
    assert [tok.convert_ids_to_tokens(s) for s in aset.seqs[0][1]] == [["\u2581", "1", "2"]]
    aset.check_distinct([["3", "12"], ["4", "5"]])


def test_qwen_chat_teens_share_their_first_digit_and_are_scored_whole():
    vlm, ts = _real("qwen2_5_vl")
    b = vlm.encode([ts[3]])
    assert vlm.answer_ids(b, ["1"]).tolist() == vlm.answer_ids(b, ["12"]).tolist()  # old: 10-19 all score "1"
    aset = vlm.answers(b, [["12", "1"]])
    assert aset.rule == "sequence" and [len(s) for s in aset.seqs[0][0]] == [2]
    assert vlm.tokenizer.decode(aset.seqs[0][0][0]) == "12"


def test_split_colours_and_cased_forms_on_llama():
    vlm, ts = _real("llava")
    b = vlm.encode([ts[1]])  # colour question: the answer opens the assistant's reply
    aset = vlm.answers(b, [["pink", "purple"]])
    tok = vlm.tokenizer
    pink = [tok.convert_ids_to_tokens(s) for s in aset.seqs[0][0]]
    assert aset.rule == "sequence" and ["\u2581p", "ink"] in pink and len(pink) == 2  # pink and Pink
    assert vlm.answer_ids(b, ["pink"]).tolist() == [tok.convert_tokens_to_ids("\u2581p")]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "llava_onevision", "idefics2"])
def test_answer_tokens_are_what_the_template_writes_for_the_assistant(family):
    """The scored tokens of a colour answer are the first tokens of the assistant turn the checkpoint's own
    template writes for that answer (both cases), after the prompt's tokens."""
    from vismech.models.framing import render

    vlm, ts = _real(family)
    t = ts[1]
    b = vlm.encode([t])
    aset = vlm.answers(b, [["blue"]])
    prompt = b.inputs["input_ids"][0].tolist()
    for form, seq in zip(("blue", "Blue"), aset.seqs[0][0]):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t.prompt}]},
                {"role": "assistant", "content": [{"type": "text", "text": form}]}]
        text = vlm.tokenizer.apply_chat_template(msgs, chat_template=vlm.framing.template, tokenize=False)
        start = render(vlm.tokenizer, vlm.framing, t.prompt, True)[0]
        assert text.startswith(start)
        full = vlm.tokenizer(b.texts[0] + text[len(start):])["input_ids"]
        assert full[:len(prompt)] == prompt and full[len(prompt):len(prompt) + len(seq)] == seq


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_edited_runs_score_sequences_with_each_rows_own_edit(family):
    """EditedRuns on scoring rows: an edit of batch row 1 reaches all of row 1's scoring rows and no other; the
    scores equal each trial run alone with the edit at its own last token."""
    from vismech.engine import hooks
    from vismech.engine import interventions as iv

    vlm = tiny(family)
    trials = two_object_trials()
    cands = [[["blue circle"], ["red"]], [["blue heart", "blue"], ["green triangle"]]]
    b = vlm.encode(trials)
    aset = forced(vlm, b, cands)
    runs = iv.EditedRuns(vlm, b, first_position=b.last, answers=aset)
    assert (runs.scores().scores - vlm.score_answers(b, aset).scores).abs().max() < 1e-4
    value = torch.randn(1, vlm.head_dim, generator=torch.Generator().manual_seed(0)) * 5
    edit = hooks.Edit("z", 1, torch.tensor([1]), torch.tensor([b.last]), torch.tensor([1]), value, "add")
    got = runs.scores([edit]).scores
    for r, t in enumerate(trials):
        one = vlm.encode([t])
        sa = forced(vlm, one, [cands[r]])
        n = len(sa.rows)
        edits = [] if r == 0 else [hooks.Edit("z", 1, torch.arange(n), torch.full((n,), one.last),
                                              torch.ones(n, dtype=torch.long), value, "add")]
        with hooks.intervene(vlm, edits):
            ref = vlm.score_answers(one, sa).scores[0]
        assert (got[r] - ref).abs().max() < 1e-4, (family, r)
    assert (got[1] - runs.scores().scores[1]).abs().max() > 1e-3  # the edit did something


def _reduce_row_by_row(aset, logits):
    """The plain per-row, per-candidate, per-form loop that ``AnswerSet.reduce`` vectorises."""
    logits = (logits[:, None] if logits.dim() == 2 else logits).float()
    logp = logits if aset.rule == "first_token" else torch.log_softmax(logits, -1)
    top = logits.argmax(-1)
    scores, greedy = torch.empty(len(aset.seqs), aset.k), torch.zeros(len(aset.seqs), aset.k, dtype=torch.bool)
    for b, row in enumerate(aset.seqs):
        for c, cand in enumerate(row):
            vals, hits = [], []
            for f, s in enumerate(cand):
                r = b if aset.rule == "first_token" else aset.where[b][c][f]
                at = torch.arange(len(s))
                vals.append(logp[r, at, torch.tensor(s)].sum())
                hits.append(bool((top[r, at] == torch.tensor(s)).all()))
            scores[b, c] = torch.logsumexp(torch.stack(vals), 0) if len(vals) > 1 else vals[0]
            greedy[b, c] = any(hits)
    return scores, greedy


@pytest.mark.parametrize("rule", ["first_token", "sequence"])
def test_vectorised_reduce_equals_the_row_by_row_loop(rule):
    from vismech.models.answers import AnswerSet

    g = torch.Generator().manual_seed(0)
    if rule == "first_token":
        seqs = [[[[3]], [[7], [9]]], [[[1]], [[4]]], [[[5], [6], [2]], [[8]]]]
    else:  # forms of different lengths, shared prefixes (one scoring row serves several forms)
        seqs = [[[[3, 4]], [[7], [3, 5, 6]]], [[[1, 2, 3]], [[4, 4]]], [[[5], [6, 1]], [[8, 8, 8], [8, 2]]]]
    aset = AnswerSet(rule, seqs)
    n_rows = len(seqs) if rule == "first_token" else len(aset.rows)
    for trial in range(20):
        logits = torch.randn(n_rows, aset.tail, 12, generator=g) * 3
        if trial % 4 == 0:  # force greedy hits on some forms
            for b, row in enumerate(seqs):
                for c, cand in enumerate(row):
                    s = cand[-1]
                    r = b if rule == "first_token" else aset.where[b][c][len(cand) - 1]
                    for i, t in enumerate(s):
                        logits[r, i, t] = 50.0
        got = aset.reduce(logits if aset.tail > 1 else logits[:, 0])
        want_s, want_g = _reduce_row_by_row(aset, logits)
        assert torch.equal(got.greedy, want_g)
        assert torch.allclose(got.scores, want_s, atol=1e-6, rtol=0)
        assert got.greedy.any() or trial % 4


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_hits_from_the_continuation_equal_teacher_forced_hits(family):
    """``AnswerSet.greedy_from`` reads greedy hits off ``generate_ids`` and agrees with the scoring forward, under
    both rules, for forms the model writes (hits) and forms that leave its path at the first or a later token."""
    from vismech.scenes.sets import scene_description_set

    vlm = tiny(family)
    special = set(vlm.tokenizer.all_special_ids) | {vlm.image_token_id}
    for seed in range(50):  # trials whose continuation is text (a random tiny model can write an image token,
        b = vlm.encode(scene_description_set(2, (2, 2), n_objects=3, seed=seed))  # which no answer holds)
        ids = vlm.generate_ids(b, 3)
        gen = ids.tolist()
        if not special & {t for g in gen for t in g}:
            break
    other = [(g[0] + 1) % len(vlm.tokenizer) for g in gen]
    seq = AnswerSet("sequence", [[[g[:2]], [g[:1] + [(g[1] + 1) % len(vlm.tokenizer)]], [[o, g[1]]], [g[:3], [o]]]
                                 for g, o in zip(gen, other)])
    first = AnswerSet("first_token", [[[g[:1]], [[o]]] for g, o in zip(gen, other)])
    for aset, want_row in ((seq, [True, False, False, True]), (first, [True, False])):
        got = aset.greedy_from(ids, 3)
        assert got.tolist() == [want_row] * len(gen)
        assert torch.equal(got, vlm.score_answers(b, aset).greedy), (family, aset.rule)
    assert seq.greedy_from(ids, 2) is None  # a form of 3 tokens needs 3 generated ones


def test_first_token_scores_from_the_answers_own_logits_equal_the_whole_vocabulary():
    from vismech.engine import hooks
    from vismech.models.answers import AnswerSet

    seqs = [[[[3]], [[7], [9]]], [[[1]], [[4]]], [[[5], [6], [2]], [[8]]]]
    aset = AnswerSet("first_token", seqs)
    vocab = aset.vocab()
    assert vocab.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1)) * 3
    full, part = aset.reduce(logits), aset.reduce(logits[:, vocab], vocab)
    assert torch.equal(part.scores, full.scores) and part.greedy is None
    seq = AnswerSet("sequence", [[[[3, 4]], [[7]]]])
    assert seq.vocab() is None
    with pytest.raises(ValueError, match="first-token"):
        seq.reduce(torch.randn(len(seq.rows), 2, 12), torch.tensor([3, 4, 7]))
    # the output projection's rows of those ids give those columns of the whole projection
    vlm = tiny("qwen2_5_vl")
    batch = vlm.encode(two_object_trials())
    inp, _ = replay.lm_inputs(vlm, batch)
    out = hooks.language_model(vlm)(**inp.tensors, use_cache=False)
    ids = torch.tensor([2, 5, 11])
    whole = replay.output_logits(vlm, out)
    assert float((replay.output_logits(vlm, out, vocab=ids) - whole[:, ids]).abs().max()) < 1e-6

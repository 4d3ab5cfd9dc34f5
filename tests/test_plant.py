"""Planting: the high-level causal model (golden cases), the batches it builds (every position decodes to the right
token), and the patched forward (equal to a hand-made patch with hooks)."""

import contextlib
import itertools
import random

import pytest
import torch

from vismech.engine import hooks
from vismech.errors import UserError
from vismech.models.families import family_for_config
from vismech.models.vlm import VLM
from vismech.organism import causal_model as cm
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import position_probe
from vismech.organism.config import build_organism
from vismech.scenes.core import Obj

SIZES = {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8),
         "vision": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])}
SPEC = plant.PlantSpec(binding=((0, 0),), retrieval=((1, 0), (1, 1)), gathering=((2, 0),), selection=((3, 0),),
                       features=((4, 1),), probe_layer=0)


@pytest.fixture(scope="module")
def vlm():
    model, tok, proc = build_organism("qwen2_5_vl", 0, **SIZES)
    return VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-plant", "chat")


# -- the causal model ------------------------------------------------------------------------------------------
def _scene_trial():
    objs = [Obj("red", "circle", (0, 0)), Obj("blue", "square", (0, 2)), Obj("green", "star", (1, 1)),
            Obj("pink", "heart", (2, 0))]
    return cm.build("describe", (3, 3), objs, [objs[2], objs[0]])  # green star, red circle described


def test_selection_is_the_first_undescribed_cell_in_reading_order():
    t = _scene_trial()
    assert t.prompt == "In this image there is a green star, a red circle and a"
    assert t.answer == "blue square" and t.meta["ordered"] is False
    assert cm.selected_cell(t) == (0, 2)
    # R from a source where the red circle sits at (0, 2): the described cells are (1, 1) and (0, 2), so the first
    # undescribed occupied cell is (0, 0), where the base image has the red circle
    assert cm.selected_cell(t, [(1, 1), (0, 2)]) == (0, 0)
    assert cm.answer_at(t, (0, 0)) == "red circle"


def test_counterfactual_answers_of_a_swap_and_a_feature_source():
    t = _scene_trial()
    red, blue = t.scene.at((0, 0)), t.scene.at((0, 2))
    mapping = {o: o for o in t.scene.objects}
    mapping[red], mapping[blue] = Obj("red", "circle", (0, 2)), Obj("blue", "square", (0, 0))
    swap = cm._rebuild(t, mapping)
    assert swap.prompt == t.prompt and swap.answer == "blue square"  # still first undescribed: now at (0, 0)
    assert cm.counterfactual_answer(t, swap, "R") == "red circle"
    assert cm.counterfactual_answer(t, swap, "S") == "red circle"  # source's S is (0, 0), read in the base image
    assert cm.counterfactual_answer(t, swap, "none") == "blue square"
    feat = cm.feature_source(t, random.Random(0))
    assert feat.prompt == t.prompt and feat.target.cell == (0, 2) and feat.answer != t.answer
    assert cm.counterfactual_answer(t, feat, "F") == feat.answer
    colour = cm.build("color", (2, 2), [Obj("red", "circle", (0, 0)), Obj("blue", "star", (1, 1))],
                      target=Obj("blue", "star", (1, 1)))
    assert cm.selected_cell(colour) == (1, 1) and cm.answer_at(colour, (0, 0)) == "red"
    assert cm.feature_source(colour, random.Random(0)).target.shape == "star"  # the question names the shape


def test_sources_keep_the_layout_and_swaps_look_for_a_changed_answer():
    rng = random.Random(1)
    changed = 0
    for _ in range(60):
        kind = rng.choice(cm.KINDS)
        t = cm.planting_trial(rng, cm.draw_structure(rng, kind, rng.choice([(2, 2), (3, 3)])), "any")
        sw = pb.informative_swap(t, rng)
        assert sw.prompt == t.prompt and cm.feature_source(t, rng).prompt == t.prompt
        rs = cm.resample_source(t, rng)
        assert len(rs.prompt.split()) == len(t.prompt.split()) and len(rs.answer.split()) == len(t.answer.split())
        changed += cm.counterfactual_answer(t, sw, "R") != t.answer
    assert changed > 40


# -- batches ---------------------------------------------------------------------------------------------------
def test_every_supervised_position_decodes_to_the_right_token(vlm):
    b = pb.make_batch(vlm, SPEC, seed=2, step=5, n=4, end_token="<|im_end|>")
    planned = pb.step_plan(SPEC, 2, 5, 4)
    ids, tok, img = b["a_input_ids"], vlm.tokenizer, vlm.image_token_id
    word = lambda r, p: tok.convert_ids_to_tokens(int(ids[r, p]))  # noqa: E731
    seen, finals = {c: 0 for c in plant.COMPONENTS}, 0
    for comp in plant.COMPONENTS:
        for (r, col), keys in zip(b[f"att_{comp}_where"].tolist(), b[f"att_{comp}_keys"]):
            q, ks = int(b["att_qpos"][r, col]), keys.nonzero().flatten().tolist()
            t = planned.a[r].trial
            image = (ids[r] == img).nonzero().flatten().tolist()
            tokens_of = lambda o: [image[i] for i in vlm.layout(t.scene.grid).cell_tokens(o.cell)]  # noqa: E731
            final = ids.shape[1] - (len(planned.a[r].answer.split()) + 1) - 1  # the prompt's last token
            seen[comp] += 1
            if comp == "binding":
                assert ks == [q - 1] and (word(r, q - 1), word(r, q)) in {(o.color, o.shape) for o in t.mentioned}
            elif comp == "retrieval":
                obj = next(o for o in t.mentioned if o.shape == word(r, q) and o.name.split()[0] in
                           (word(r, q - 1), "") or (t.task == "color_retrieval" and o.shape == word(r, q)))
                assert ks == tokens_of(obj)
            elif comp == "gathering":
                first = int(b["a_attention_mask"][r].nonzero()[0])
                assert ks == [first] or all(word(r, k) in {o.shape for o in t.mentioned} and k < q for k in ks)
            else:
                named = [o for o in t.scene.objects if ks == tokens_of(o)]
                assert len(named) == 1
                if q in (final, final + 1):  # the final naming positions name the target
                    assert named[0] == t.target
                    finals += 1
    assert all(seen.values()) and finals >= 2 * 4  # selection and features, at least one final position per row
    for r in range(4):  # clean rows label their answer (and, in reading order, the described objects' words)
        lab = b["a_labels"][r]
        answer = tok.convert_ids_to_tokens([int(x) for x in lab[lab != -100]])
        assert answer[-1] == "<|im_end|>" and " ".join(answer[-1 - len(planned.a[r].answer.split()):-1]) == \
            planned.a[r].answer


def test_patch_masks_touch_only_what_each_row_intervenes_on(vlm):
    b = pb.make_batch(vlm, SPEC, seed=3, step=1, n=3, end_token="<|im_end|>")
    planned = pb.step_plan(SPEC, 3, 1, 3)
    declared = set(SPEC.planted)
    for k, (row, kind, src) in enumerate(planned.b):
        m = b["b_patch"][k]
        heads = {(int(l), int(h)) for _, l, h in m.nonzero().tolist()}
        pos = sorted({int(p) for p, _, _ in m.nonzero().tolist()})
        lab = b["b_labels"][k]
        answer = " ".join(vlm.tokenizer.convert_ids_to_tokens([int(x) for x in lab[lab != -100]])[:-1])
        assert answer == row.answer
        assert int(b["b_source"][k]) == src
        if kind == "R":
            assert heads == set(SPEC.retrieval)
            assert all(vlm.tokenizer.convert_ids_to_tokens(int(b["b_input_ids"][k, p])) in row.trial.prompt
                       for p in pos)
        elif kind.startswith("S"):
            assert heads in (set(SPEC.gathering), set(SPEC.selection))
        elif kind == "F":
            assert heads == set(SPEC.features)
        else:
            assert heads - declared  # some undeclared heads are resampled
            last = int(b["b_input_ids"].shape[1] - (lab != -100).sum() - 1)
            for layer, head in SPEC.features + SPEC.selection:
                assert not m[last, layer, head]  # declared heads keep their declared positions
        if kind in ("S_gathering", "S_selection", "F"):
            last = int(b["b_input_ids"].shape[1] - (lab != -100).sum() - 1)
            assert pos[0] == last and len(pos) <= 2


@pytest.fixture(scope="module")
def llava():
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
    model, tok, proc = build_organism("llava", 0, text=SIZES["text"], vision=vision)
    return VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-plant-llava", "chat")


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_patched_rows_equal_a_patch_made_by_hand(arch, request):
    vlm = request.getfixturevalue("vlm" if arch == "qwen2_5_vl" else "llava")
    b = pb.make_batch(vlm, SPEC, seed=4, step=0, n=2, end_token="<|im_end|>" if arch == "qwen2_5_vl" else "</s>")
    with torch.no_grad():
        logits_a, z_a, att, resid = plant.clean_forward(vlm, SPEC, b)
        logits_b = plant.patched_forward(vlm, b, z_a)
    for k in range(len(b["b_source"])):
        src, mask = int(b["b_source"][k]), b["b_patch"][k]
        one = {key: v[k:k + 1] for key, v in plant._inputs(b, "b_").items()}
        assert "pixel_values" not in one  # intervened rows reuse their base's image features
        g = int(b["b_base"][k])  # the row shows its base's image: run the vision tower on it here
        if arch == "qwen2_5_vl":  # patches of every image in one tensor, M-RoPE positions
            grid = b["a_image_grid_thw"]
            per = (grid.prod(-1)).tolist()
            start = sum(per[:g])
            one["pixel_values"], one["image_grid_thw"] = b["a_pixel_values"][start:start + per[g]], grid[g:g + 1]
            one["position_ids"] = b["b_position_ids"][:, k:k + 1]
        else:
            one["pixel_values"] = b["a_pixel_values"][g:g + 1]
        edits = []
        for p, layer, head in mask.nonzero().tolist():
            edits.append(hooks.Edit("z", layer, torch.tensor([0]), torch.tensor([p]), torch.tensor([head]),
                                    z_a[layer][src, p, head][None]))
        with torch.no_grad(), hooks.intervene(vlm, edits):
            hand = vlm.model(**one, use_cache=False).logits[0]
        assert torch.allclose(hand, logits_b[k], atol=2e-5), (k, (hand - logits_b[k]).abs().max())
    # attention probabilities are distributions over keys
    for layer, p in att.items():
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)


def test_a_few_steps_lower_the_loss_and_reach_every_declared_head(vlm):
    torch.manual_seed(0)
    probe = position_probe.make_probe(vlm)
    opt = torch.optim.AdamW(list(vlm.model.parameters()) + list(probe.parameters()), lr=3e-3)
    vlm.model.train()
    batch = pb.make_batch(vlm, SPEC, seed=0, step=0, n=3, end_token="<|im_end|>")
    first = None
    for step in range(4):
        loss, metrics = plant.plant_loss(vlm, SPEC, probe, batch)
        loss.backward()
        if step == 0:
            first = float(loss)
            o = vlm.attention(SPEC.features[0][0]).o_proj.weight.grad
            assert o is not None and o.abs().sum() > 0
            assert set(metrics) >= {"iit_R_acc", "iit_S_acc", "iit_F_acc", "iit_strict_acc", "att_features"}
        opt.step()
        opt.zero_grad()
    vlm.model.eval()
    assert float(loss) < first


def test_the_readme_commands_plant_an_organism_and_validate_it(tmp_path, capsys):
    """``vismech train-organism --arch llava ... --plant ids`` (a narrow 7-layer model, 2 steps on the CPU) writes the declared
    ground truth, the validity measures and a card that shows both; ``python -m vismech.organism.validate`` reads
    them back from any planted checkpoint."""
    import json

    from vismech.app.cli import main
    from vismech.models.ground_truth import load_ground_truth
    from vismech.organism import validate

    out = tmp_path / "ids"
    sizes = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=8),
             "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=16)}
    assert main(["train-organism", "--arch", "llava", "--out", str(out), "--plant", "ids", "--steps", "2",
                 "--batch-size", "1", "--eval-n", "2", "--device", "cpu", "--sizes", json.dumps(sizes)]) == 0
    assert load_ground_truth(out) == plant.ground_truth(plant.PlantSpec())
    card = (out / "README.md").read_text()
    assert "## Ground truth (planted)" in card and "| id_retrieval | L2H0, L2H1 |" in card and "--plant ids" in card
    assert "## Validity as a positive control" in card
    measures = json.loads((out / "validity.json").read_text())
    assert set(measures) == {"accuracy", "interchange", "ablation", "probes"}
    assert set(measures["interchange"]) == {"R", "S_gathering", "S_selection", "F"}
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert "iit_F_acc" in log[-1]["plant"]
    capsys.readouterr()
    assert validate.main([str(out), "--trials", "4", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["accuracy"].keys() == measures["accuracy"].keys()
    assert all(r["n"] == 4 and 0 <= r["rate"] <= 1 for r in again["accuracy"].values())
    # one measure at its own trial count (the single-head resampling needs hundreds of trials for 2 points)
    assert validate.main([str(out), "--measures", "ablation", "--ablation-trials", "6", "--device", "cpu"]) == 0
    only = json.loads(capsys.readouterr().out)
    assert set(only) == {"ablation"} and only["ablation"]["clean"]["n"] == 6
    assert validate.main([str(out), "--measures", "ablation,probe", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown measure(s) probe" in err[0]
    # a later stage from this checkpoint (a repair: layers 0-1 frozen) declares the same heads and says its history
    again = tmp_path / "repaired"
    assert main(["train-organism", "--arch", "llava", "--out", str(again), "--plant", "ids", "--steps", "1",
                 "--batch-size", "1", "--eval-n", "2", "--device", "cpu", "--sizes", json.dumps(sizes),
                 "--init-from", str(out), "--freeze-through", "1"]) == 0
    gt = load_ground_truth(again)
    assert gt.stages == load_ground_truth(out).stages
    assert gt.method == (load_ground_truth(out).method
                         + "; then trained again by vismech.organism.plant with layers 0-1 frozen")
    assert f"Method: {gt.method}. Position probe" in (again / "README.md").read_text()  # the card says the history


def test_a_planting_state_saved_before_a_spec_field_existed_resumes_and_another_spec_is_refused(tmp_path):
    """A training state whose saved planting spec lacks a field added since (``ring_probe``: such runs behaved as its
    default) resumes and finishes; resuming it with a spec that differs is refused with one error."""
    import json

    from vismech.organism.resume import STATE
    from vismech.organism.train import train_organism

    sizes = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=8),
             "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=16)}
    out = tmp_path / "r"
    kw = dict(steps=2, batch_size=1, eval_n=1, progress=False, device="cpu", sizes=sizes)
    assert train_organism("llava", out, stop_at=1, plant=plant.PlantSpec(), **kw).summary["stopped_at"] == 1
    state = torch.load(out / STATE, weights_only=True)
    old = json.loads(state["run"]["plant"])
    del old["ring_probe"]
    state["run"]["plant"] = json.dumps(old, sort_keys=True)
    torch.save(state, out / STATE)
    with pytest.raises(UserError, match="trained with plant="):
        train_organism("llava", out, resume=True, plant=plant.PlantSpec(ring_probe=True), **kw)
    res = train_organism("llava", out, resume=True, plant=plant.PlantSpec(), **kw)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert res.summary.get("stopped_at") is None and log[-1]["step"] == 2


def test_dropped_late_mlps_stay_zero_through_training_and_resume(tmp_path, capsys):
    """With ``drop_late_mlps`` the MLPs of the layers after the feature heads are zero from the first step to the
    saved organism, across a resume, and add nothing to the residual stream; the layers before them train. The ground
    truth and the card say so; the option with ``strict_late_mlps`` is refused with one error."""
    import json

    from vismech.app.cli import main
    from vismech.models.load import load_vlm
    from vismech.organism.card import reproduce_command
    from vismech.organism.train import train_organism

    sizes = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=8),
             "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=16)}
    spec = plant.PlantSpec(drop_late_mlps=True)
    assert plant.late_layers(spec, 8) == [7]
    out = tmp_path / "d"
    kw = dict(steps=2, batch_size=1, eval_n=1, progress=False, device="cpu", sizes=sizes, lr=0.01)
    train_organism("llava", out, stop_at=1, plant=spec, **kw)
    train_organism("llava", out, resume=True, plant=spec, **kw)
    vlm = load_vlm(str(out), dtype="fp32", device="cpu")
    late = [p for p in vlm.layers[7].mlp.parameters()]
    assert late and all(float(p.detach().abs().max()) == 0 for p in late)
    model, _, _ = build_organism("llava", 0, **sizes)  # the same seed's fresh weights: layer 6 has moved from them
    lm = dict(model.named_parameters())
    moved = [n for n, p in vlm.model.named_parameters() if "layers.6.mlp" in n and not torch.equal(p, lm[n])]
    assert moved
    seen = {}
    handle = vlm.layers[7].mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o))
    with torch.no_grad():
        objs = [Obj("red", "circle", (0, 0)), Obj("blue", "square", (1, 1))]
        vlm.model(**vlm.encode([cm.build("describe", (2, 2), objs, objs[:1])]).inputs)
    handle.remove()
    assert seen["out"].abs().max() == 0
    assert "removed" in json.loads((out / "ground_truth.json").read_text())["method"]
    info = {"arch": "llava", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant-drop-late-mlps" in reproduce_command(info)
    capsys.readouterr()
    assert main(["train-organism", "--arch", "llava", "--out", str(tmp_path / "e"), "--plant", "ids",
                 "--plant-drop-late-mlps", "--plant-strict-late-mlps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "either" in err[0] and not (tmp_path / "e").exists()


def test_the_invariance_term_starts_at_its_step(capsys, tmp_path):
    """With ``invariance_from`` the steps before it draw no invariance rows and the others exactly as they would;
    from it on they draw the spec's own; the card and the command line carry it, a negative step is refused."""
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command

    late = plant.PlantSpec(**{**SPEC.__dict__, "invariance_from": 7})
    off = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("invariance", 0.0),)})
    for step in (0, 6):
        early, plain = pb.step_plan(late, 3, step, 4), pb.step_plan(off, 3, step, 4)
        assert not early.inv and [r.trial for r in early.a] == [r.trial for r in plain.a]
    for step in (7, 20):
        got, want = pb.step_plan(late, 3, step, 4), pb.step_plan(SPEC, 3, step, 4)
        assert got.inv and got.inv == want.inv and [r.trial for r in got.a] == [r.trial for r in want.a]
    info = {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": late, "device": "cuda"}
    assert " --plant-invariance-from 7" in reproduce_command(info)
    with pytest.raises(SystemExit) as e:  # refused by the argument parser
        main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant", "ids",
              "--plant-invariance-from", "-1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ">= 0" in err[0] and not (tmp_path / "o").exists()


def test_the_invariance_term_is_zero_for_a_copy_and_positive_for_other_features(vlm):
    """With an invariance weight each base gets a source whose described object has other features at the same
    cell; the term compares the ID-retrieval heads' outputs at that mention's last word. It is exactly 0 when the
    source row is the base row itself, and positive for the real source of an untrained model; without the weight
    the step's rows are unchanged."""
    spec = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("invariance", 1.0),)})
    off = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("invariance", 0.0),)})
    plain = pb.step_plan(off, 5, 2, 3)
    plan = pb.step_plan(spec, 5, 2, 3)
    assert [r.trial for r in plan.a[:len(plain.a)]] == [r.trial for r in plain.a] and not plain.inv
    assert len(plan.inv) == 3 and len(plan.a) == len(plain.a) + 3
    for g, i, j in plan.inv:
        base, src = plan.a[g].trial, plan.a[i].trial
        assert base.mentioned[j].cell == src.mentioned[j].cell and base.mentioned[j].name != src.mentioned[j].name
        assert len(vlm.tokenizer(base.prompt)["input_ids"]) == len(vlm.tokenizer(src.prompt)["input_ids"])
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    ids = b["a_input_ids"]
    for g, i, pos in b["inv_where"].tolist():  # the position is the changed mention's shape word in both rows
        assert vlm.tokenizer.convert_ids_to_tokens(int(ids[g, pos])) in {o.shape for o in plan.a[g].trial.mentioned}
        assert ids[g, pos] != ids[i, pos] or ids[g, pos - 1] != ids[i, pos - 1]
    probe = position_probe.make_probe(vlm)
    with torch.no_grad():
        _, m = plant.plant_loss(vlm, spec, probe, b)
        assert m["loss_invariance"] > 0
        same = dict(b, inv_where=b["inv_where"][:, [0, 0, 2]])
        _, m0 = plant.plant_loss(vlm, spec, probe, same)
    assert m0["loss_invariance"] == 0.0
    with pytest.raises(ValueError, match="unknown or negative"):
        plant.PlantSpec(weights=(("invariant", 1.0),)).check(8, 8)


def test_the_selection_invariance_term_pairs_bases_with_their_feature_sources(vlm):
    """With an ``invariance_s`` weight the gathering heads are compared over the invariance sources and the selection
    heads over the F interchange's sources (the target's features replaced at its cell, same prompt), at each row's
    last prompt token: the term equals a computation by hand over those pairs, is exactly 0 when every source row is
    its base, and the batch of a spec without the weight has none of its tensors."""
    from vismech.organism import invariance

    spec = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("invariance_s", 1.0),)})
    plan = pb.step_plan(spec, 5, 2, 3)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    assert "f_pairs" not in pb.batch_of(vlm, SPEC, plan, "<|im_end|>", 0)
    pairs, last, ids = b["f_pairs"].tolist(), b["last_pos"], b["a_input_ids"]
    assert [g for g, _ in pairs] == [0, 1, 2]
    for g, f in pairs:
        base, src = plan.a[g].trial, plan.a[f].trial
        assert src.prompt == base.prompt and src.target.cell == base.target.cell and src.target != base.target
        for row, t in ((g, base), (f, src)):  # the answer follows the last prompt token
            assert vlm.tokenizer.decode(ids[row, int(last[row]) + 1:]).strip().startswith(t.answer)
        assert ids[g, last[g]] == ids[f, last[f]]
    z = {}
    with contextlib.ExitStack() as st, torch.no_grad():
        for layer in range(vlm.n_layers):
            st.enter_context(hooks.hooked(vlm, "z", layer, lambda x, layer=layer: z.__setitem__(layer, x)))
        vlm.model(**plant._inputs(b, "a_"), use_cache=False)
    want = []
    for heads, rows in ((spec.gathering, [(g, i) for g, i, _ in b["inv_where"].tolist()]), (spec.selection, pairs)):
        for g, i in rows:
            for layer, head in heads:
                zb, zs = z[layer][g, last[g], head], z[layer][i, last[i], head]
                want.append(float(((zb - zs) ** 2).sum() / (zb.pow(2).sum() + zs.pow(2).sum() + 1e-6)))
    got = invariance.terms(spec, b, z)
    assert abs(float(got["invariance_s"]) - sum(want) / len(want)) < 1e-6 and float(got["invariance_s"]) > 0
    same = dict(b, f_pairs=b["f_pairs"][:, [0, 0]], inv_where=b["inv_where"][:, [0, 0, 2]])
    assert float(invariance.terms(spec, same, z)["invariance_s"]) == 0.0
    probe = position_probe.make_probe(vlm)
    with torch.no_grad():
        _, m = plant.plant_loss(vlm, spec, probe, b)
    assert abs(float(m["loss_invariance_s"]) - float(got["invariance_s"])) < 1e-5


def test_the_key_invariance_term_compares_the_targets_keys_with_its_feature_sources(vlm):
    """With an ``invariance_k`` weight the selection and feature heads' keys (their key/value heads) at the target's
    image tokens are compared between each base and its F source (the target's features replaced at its cell):
    the pairs are the tokens the feature heads are taught to attend to, in both rows; the term equals a computation
    by hand from keys captured with hooks, is 0 for a copy, and ``plant_loss`` reports it."""
    from vismech.organism import invariance

    spec = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("invariance_k", 1.0), ("invariance", 0.0))})
    plan = pb.step_plan(spec, 5, 2, 3)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    assert "k_where" not in pb.batch_of(vlm, SPEC, plan, "<|im_end|>", 0)
    kw = b["k_where"]
    fw, fk = b["att_features_where"], b["att_features_keys"]
    for g, f in [(r.group, src) for r, kind, src in plan.b if kind == "F"]:
        mine = kw[kw[:, 0] == g]
        assert len(mine) and (mine[:, 2] == f).all()
        taught = [set(fk[k].nonzero()[:, 0].tolist()) for k in range(len(fw)) if fw[k, 0] == g]
        assert set(mine[:, 1].tolist()) in taught  # the tokens of an object the feature heads attend to
        taught_f = [set(fk[k].nonzero()[:, 0].tolist()) for k in range(len(fw)) if fw[k, 0] == f]
        assert set(mine[:, 3].tolist()) in taught_f and (b["a_input_ids"][f, mine[:, 3]] == vlm.image_token_id).all()
    assert invariance.key_heads(spec, 2) == [(3, 0), (4, 0)]
    keys = {}
    with contextlib.ExitStack() as st, torch.no_grad():
        for layer in (3, 4):
            st.enter_context(hooks.hooked(vlm, "k", layer, lambda x, layer=layer: keys.__setitem__(layer, x)))
        vlm.model(**plant._inputs(b, "a_"), use_cache=False)
    want = []
    for g, x, f, y in kw.tolist():
        for layer in (3, 4):
            kb, ks = keys[layer][g, x, 0], keys[layer][f, y, 0]
            want.append(float(((kb - ks) ** 2).sum() / (kb.pow(2).sum() + ks.pow(2).sum() + 1e-6)))
    z = {("k", layer): keys[layer] for layer in (3, 4)}
    got = float(invariance.terms(spec, b, z, 2)["invariance_k"])
    assert abs(got - sum(want) / len(want)) < 1e-6 and got > 0
    assert float(invariance.terms(spec, dict(b, k_where=kw[:, [0, 1, 0, 1]]), z, 2)["invariance_k"]) == 0.0
    with torch.no_grad():
        _, m = plant.plant_loss(vlm, spec, position_probe.make_probe(vlm), b)
    assert abs(float(m["loss_invariance_k"]) - got) < 1e-5


def test_the_guard_term_is_the_share_of_the_features_a_linear_fit_explains():
    """``invariance.guard`` is R^2 of a least-squares fit (with an intercept) of the one-hot labels from the heads'
    outputs, averaged over the label columns: equal to numpy's fit; 0 when every class has the same mean output
    (outputs that depend on a third, balanced variable only); 1 for a label the outputs copy."""
    import numpy as np

    from vismech.organism import invariance

    gen = torch.Generator().manual_seed(0)
    n, heads = 300, ((1, 0), (2, 1))
    z = {1: torch.randn(2, n, 3, 4, generator=gen), 2: torch.randn(2, n, 3, 4, generator=gen)}
    labels = torch.randint(0, 5, (n, 2), generator=gen)
    z[1][1, :, 0, 0] += labels[:, 0] * 1.5  # the first label partly in row 1's outputs
    where = torch.tensor([[1, k] for k in range(n)])
    x = torch.cat([z[1][1, :, 0], z[2][1, :, 1]], -1).double().numpy()
    xb = np.c_[x, np.ones(n)]
    r2 = []
    for col in labels.T.numpy():
        y = np.eye(5)[col]
        fit = xb @ np.linalg.lstsq(xb, y, rcond=None)[0]
        r2.append(1 - ((y - fit) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    got = float(invariance.guard(z, heads, where, labels, ridge=0.0))
    assert abs(got - np.mean(r2)) < 1e-4 and np.mean(r2) > 0.1
    combos = list(itertools.product(range(3), range(3), range(4)))  # colour, shape, cell: every combination once
    code = torch.randn(4, 8, generator=gen)
    zb = {0: torch.stack([code[k] for _, _, k in combos])[None, :, None]}
    lab = torch.tensor([[c, s] for c, s, _ in combos])
    w = torch.tensor([[0, k] for k in range(len(combos))])
    assert float(invariance.guard(zb, ((0, 0),), w, lab)) < 1e-6
    zc = {0: torch.nn.functional.one_hot(lab[:, 0], 3).float()[None, :, None]}  # the colour copied, not the shape
    assert abs(float(invariance.guard(zc, ((0, 0),), w, lab, ridge=0.0)) - 0.5) < 1e-5


def test_the_guard_term_reads_the_mentions_and_starts_with_the_invariance_terms(vlm):
    """With a ``guard`` weight the batch lists every clean row's mentions (their last word) with the mentioned
    object's colour and shape as classes: the same class exactly where the same name; ``plant_loss`` reports the
    term computed from the retrieval heads' outputs there; no rows before ``invariance_from`` or without the
    weight."""
    from vismech.organism import invariance

    spec = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("guard", 1.0),)})
    plan = pb.step_plan(spec, 5, 2, 3)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    assert "guard_labels" not in pb.batch_of(vlm, SPEC, plan, "<|im_end|>", 0)
    late = plant.PlantSpec(**{**spec.__dict__, "invariance_from": 3})
    assert "guard_labels" not in pb.batch_of(vlm, late, pb.step_plan(late, 5, 2, 3), "<|im_end|>", 0)
    where, labels, ids = b["mention_where"].tolist(), b["guard_labels"].tolist(), b["a_input_ids"]
    named = []
    for i, r in enumerate(plan.a):
        mine = [k for k, (row, _) in enumerate(where) if row == i]
        assert len(mine) == len(r.trial.mentioned)
        for k, obj in zip(mine, r.trial.mentioned):
            assert vlm.tokenizer.convert_ids_to_tokens(int(ids[i, where[k][1]])) == obj.shape
            named.append((obj.color, obj.shape, *labels[k]))
    assert len(where) > 10
    for a, c in itertools.combinations(named, 2):
        assert (a[0] == c[0]) == (a[2] == c[2]) and (a[1] == c[1]) == (a[3] == c[3])
    z = {}
    with contextlib.ExitStack() as st, torch.no_grad():
        for layer in range(vlm.n_layers):
            st.enter_context(hooks.hooked(vlm, "z", layer, lambda x, layer=layer: z.__setitem__(layer, x)))
        vlm.model(**plant._inputs(b, "a_"), use_cache=False)
    want = float(invariance.guard(z, spec.retrieval, b["mention_where"], b["guard_labels"]))
    with torch.no_grad():
        _, m = plant.plant_loss(vlm, spec, position_probe.make_probe(vlm), b)
    assert 0 < want < 1 and abs(float(m["loss_guard"]) - want) < 1e-5


def test_every_planting_option_goes_from_the_card_back_to_the_same_spec():
    """The model card's command, parsed by the command's own parser, gives back the spec it was written from, for
    specs that between them move every option of ``plant_flags.FLAGS`` off its default (some exclude each other),
    with weights and heads changed, and with nothing changed."""
    import shlex

    from vismech.app.cli import build_parser
    from vismech.app.train_cli import plant_heads
    from vismech.organism import plant_flags
    from vismech.organism.card import reproduce_command

    default = plant.PlantSpec()
    specs = [default,
             plant.PlantSpec(full_scenes=0.3, ring_probe=True, drop_late_mlps=True, invariance_from=2000,
                             weights=default.weights + (("guard", 3.0),), selection=((4, 0), (4, 1), (4, 2))),
             plant.PlantSpec(gathering_share=0.1, cell_code=True, strict_late_mlps=True),
             plant.PlantSpec(split_gathering=True, balanced_probe=True, solo=0.5)]
    moved = {f.field for f in plant_flags.FLAGS for spec in specs
             if getattr(spec, f.field) != getattr(default, f.field)}
    assert moved == {f.field for f in plant_flags.FLAGS}
    for spec in specs:
        info = {"arch": "qwen2_5_vl", "out": "runs/x", "planned_steps": 10, "seed": 0, "batch_size": 4,
                "lr": 0.001, "plant": spec, "device": "cuda"}
        args = build_parser().parse_args(shlex.split(reproduce_command(info))[1:])
        weights = dict(default.weights)
        weights.update((k, float(v)) for k, v in (w.split("=") for w in args.plant_weight or []))
        back = plant.PlantSpec(weights=tuple(weights.items()), **plant_flags.spec_fields(args),
                               **plant_heads(args.plant_heads))
        assert back == spec


def test_plant_weights_on_the_command_line_and_in_the_card(capsys, tmp_path):
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command

    spec = plant.PlantSpec(weights=plant.PlantSpec().weights + (("invariance", 2.0),))
    info = {"arch": "qwen2_5_vl", "out": "runs/x", "planned_steps": 10, "seed": 0, "batch_size": 4, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant ids --plant-weight invariance=2 " in reproduce_command(info) + " "
    assert "--plant-weight" not in reproduce_command({**info, "plant": plant.PlantSpec()})
    assert " --plant-full-scenes 0.3" in reproduce_command({**info, "plant": plant.PlantSpec(full_scenes=0.3)})
    assert main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant-weight",
                 "invariance=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "give --plant ids too" in err[0] and not (tmp_path / "o").exists()


def test_plant_heads_on_the_command_line_and_in_the_card(capsys, tmp_path):
    """``--plant-heads STAGE=L:H,...`` replaces one stage's declared heads; the card's command repeats it; a
    malformed value is one line that names the form, and nothing is written."""
    from vismech.app.cli import main
    from vismech.app.train_cli import plant_heads
    from vismech.organism.card import reproduce_command

    assert plant_heads(["gathering=3:0,3:1,3:2,3:3", "features=6:4"]) == {
        "gathering": ((3, 0), (3, 1), (3, 2), (3, 3)), "features": ((6, 4),)}
    spec = plant.PlantSpec(gathering=((3, 0), (3, 1), (3, 2), (3, 3)))
    info = {"arch": "qwen2_5_vl", "out": "runs/x", "planned_steps": 10, "seed": 0, "batch_size": 4, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    cmd = reproduce_command(info)
    assert cmd.endswith(" --plant-heads gathering=3:0,3:1,3:2,3:3") or \
        " --plant-heads gathering=3:0,3:1,3:2,3:3 " in cmd
    assert cmd.count("--plant-heads") == 1
    assert "--plant-heads" not in reproduce_command({**info, "plant": plant.PlantSpec()})
    for bad in ("gathering=3", "gather=3:0", "selection=4:x", "features="):
        assert main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant", "ids",
                     "--plant-heads", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "STAGE=LAYER:HEAD" in err[0] and not (tmp_path / "o").exists()


def test_full_scenes_fill_the_grid_and_leave_one_and_zero_keeps_the_old_draws():
    rng = random.Random(3)
    full = [cm.draw_structure(rng, k, (3, 3), 1.0) for k in ("describe", "describe_ordered")]
    assert all((s.n_objects, s.n_described) == (9, 8) for s in full)
    assert cm.draw_structure(random.Random(5), "color", (3, 3), 1.0) == cm.draw_structure(random.Random(5), "color",
                                                                                         (3, 3))
    a, b = random.Random(7), random.Random(7)
    assert [cm.draw_structure(a, "describe", (3, 3)) for _ in range(50)] == \
        [cm.draw_structure(b, "describe", (3, 3), 0.0) for _ in range(50)]
    rng = random.Random(11)
    share = sum(cm.draw_structure(rng, "describe", (3, 3), 0.25).n_described == 8 for _ in range(4000)) / 4000
    assert abs(share - (0.25 + 0.75 / 64)) < 0.025  # full draws plus the uniform draws that happen to be full
    with pytest.raises(UserError, match="full-grid"):
        plant.PlantSpec(full_scenes=1.5).check(8, 8)


def test_split_gathering_gives_each_gathering_head_its_share_of_the_mentions(vlm):
    """With ``split_gathering`` gathering head j of n is supervised on mentions j, j + n, ... of its target (the
    first token where it has none); together the heads cover exactly the unsplit target; the other components, the
    rows and the queries are unchanged, and the loss reads each head's own share."""
    from vismech.organism.card import reproduce_command

    two = plant.PlantSpec(**{**SPEC.__dict__, "gathering": ((2, 0), (2, 1))})  # two heads to share the mentions
    spec = plant.PlantSpec(**{**two.__dict__, "split_gathering": True})
    plan = pb.step_plan(two, 9, 1, 3)
    plain, split = (pb.batch_of(vlm, s, plan, "<|im_end|>", 0) for s in (two, spec))
    whole, parts = plain["att_gathering_keys"], split["att_gathering_keys"]
    n = len(spec.gathering)
    assert n == 2 and parts.shape == (len(whole), n, whole.shape[1])
    first = split["a_attention_mask"].long().argmax(1)[split["att_gathering_where"][:, 0]]
    for w, p, f in zip(whole, parts, first):
        mentions = w.nonzero().flatten().tolist()
        if mentions == [int(f)]:  # nothing described yet: every head on the first token
            assert all(p[j].nonzero().flatten().tolist() == [int(f)] for j in range(n))
            continue
        for j in range(n):
            assert p[j].nonzero().flatten().tolist() == (mentions[j::n] or [int(f)])
    assert any(len(w.nonzero()) >= 2 for w in whole)  # some targets are really split
    for k, v in plain.items():
        if k != "att_gathering_keys" and torch.is_tensor(v):
            assert torch.equal(v, split[k]), k
    probe = position_probe.make_probe(vlm)
    batch = {k: v for k, v in split.items()}
    _, metrics = plant.plant_loss(vlm, spec, probe, batch)
    assert 0 < float(metrics["att_gathering"]) < 1
    assert " --plant-split-gathering" in reproduce_command(
        {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
         "plant": spec, "device": "cuda"})


def test_set_probe_reads_the_gathered_cells_where_selection_reads(vlm):
    """With a ``set_probe`` weight, every naming position's target is the set of cells its gathered mentions name
    (at the last token: every described object's); the probe reads the residual stream entering the selection layer,
    its loss is a positive binary cross-entropy that trains only the set probe's outputs, and without the weight the
    probe and the loss are as before."""
    spec = plant.PlantSpec(**{**SPEC.__dict__, "weights": SPEC.weights + (("set_probe", 1.0),)})
    assert plant.set_layer(spec) == 2
    plan = pb.step_plan(spec, 9, 1, 3)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    where, cells = b["set_where"], b["set_cells"]
    assert len(where) == len(b["att_selection_where"]) and cells.shape == (len(where), 9)
    last = {}
    for (i, pos), hot in zip(where.tolist(), cells.tolist()):
        t = plan.a[i].trial
        got = {(c // 3, c % 3) for c in range(9) if hot[c]}
        assert got <= {tuple(o.cell) for o in t.mentioned}
        assert t.task == "color_retrieval" or tuple(t.target.cell) not in got  # a description names the rest
        if pos >= last.get(i, (-1,))[0]:
            last[i] = (pos, got)
    for i, (pos, got) in last.items():  # the row's last naming position has gathered every mention
        t = plan.a[i].trial
        assert got == {tuple(o.cell) for o in t.mentioned}, (t.task, pos)
    assert len(last) == len(plan.a)
    probe = position_probe.make_probe(vlm, spec)
    assert probe.out_features == 15 and position_probe.make_probe(vlm, SPEC).out_features == 6
    loss, m = plant.plant_loss(vlm, spec, probe, b)
    assert float(m["loss_set_probe"]) > 0 and 0 <= float(m["set_probe_acc"]) <= 1
    probe.zero_grad()
    vlm.model.zero_grad()
    m2 = plant.plant_loss(vlm, spec, probe, b)[1]
    assert torch.isfinite(loss)
    only = plant.PlantSpec(**{**spec.__dict__, "weights": tuple((t, 1.0 if t == "set_probe" else 0.0)
                                                                  for t in plant.LOSS_TERMS)})
    probe.zero_grad()
    plant.plant_loss(vlm, only, probe, b)[0].backward()
    assert probe.weight.grad[6:].abs().sum() > 0 and probe.weight.grad[:6].abs().sum() == 0
    assert float(m2["loss_set_probe"]) == pytest.approx(float(m["loss_set_probe"]))
    assert "loss_set_probe" not in plant.plant_loss(vlm, SPEC, position_probe.make_probe(vlm, SPEC), b)[1]


def test_gathering_share_targets_a_sum_of_the_mentions(vlm, capsys, tmp_path):
    """With ``gathering_share`` s, a gathering head's target is s on each gathered mention and the rest on the first
    token (which is always among its keys); the loss is the cross-entropy against that target (checked by hand);
    the card repeats the option and the command line refuses a share over 1/8 or one beside split gathering."""
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command

    spec = plant.PlantSpec(**{**SPEC.__dict__, "gathering_share": 0.1})
    plan = pb.step_plan(SPEC, 9, 1, 3)
    plain, shared = (pb.batch_of(vlm, s, plan, "<|im_end|>", 0) for s in (SPEC, spec))
    first = shared["a_attention_mask"].long().argmax(1)[shared["att_gathering_where"][:, 0]]
    for w, s_, f in zip(plain["att_gathering_keys"], shared["att_gathering_keys"], first):
        mentions = set(w.nonzero().flatten().tolist()) - {int(f)}
        assert set(s_.nonzero().flatten().tolist()) == mentions | {int(f)}
    assert any(int(k.sum()) >= 3 for k in shared["att_gathering_keys"])  # rows with two mentions or more
    keys = torch.tensor([[False, True, False, True, True], [False, True, False, False, False]])
    p = torch.tensor([[0.1, 0.5, 0.1, 0.2, 0.1], [0.2, 0.6, 0.1, 0.05, 0.05]])
    want = -(0.8 * torch.log(torch.tensor(0.5 + 1e-6)) + 0.1 * torch.log(torch.tensor(0.2 + 1e-6))
             + 0.1 * torch.log(torch.tensor(0.1 + 1e-6)) + torch.log(torch.tensor(0.6 + 1e-6))) / 2
    assert float(plant.share_loss(p, keys, 0.1)) == pytest.approx(float(want), rel=1e-5)
    loss, _ = plant.plant_loss(vlm, spec, position_probe.make_probe(vlm, spec), shared)
    assert torch.isfinite(loss)
    info = {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant-gathering-share 0.1" in reproduce_command(info)
    for extra in (["--plant-gathering-share", "0.2"], ["--plant-gathering-share", "0.1", "--plant-split-gathering"]):
        try:
            code = main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant", "ids",
                         *extra])
        except SystemExit as e:  # argparse's own refusal of an out-of-range value
            code = e.code
        assert code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "gathering" in err[0] and not (tmp_path / "o").exists()


def test_strict_rows_resample_the_late_mlps_as_a_patch_made_by_hand(capsys, tmp_path):
    """With ``strict_late_mlps`` the strict rows also take the MLP outputs of the layers after the feature heads
    from their source row (each layer with probability ``strict_p``, every position of the row); no other row and
    no earlier layer is touched. A patched row equals the same row run by hand with its head outputs and those MLP
    outputs replaced; the card and the command line carry the option."""
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command

    sizes = {**SIZES, "text": {**SIZES["text"], "num_hidden_layers": 7}}
    model, tok, proc = build_organism("qwen2_5_vl", 0, **sizes)
    vlm = VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-plant-7", "chat")
    spec = plant.PlantSpec(**{**SPEC.__dict__, "strict_late_mlps": True})
    assert plant.late_layers(spec, 7) == [5, 6]
    plan = pb.step_plan(spec, 4, 0, 4)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    mlp = b["b_patch_mlp"]
    strict = [k for k, (_, kind, _) in enumerate(plan.b) if kind == "strict"]
    assert strict and not mlp[[k for k in range(len(plan.b)) if k not in strict]].any()
    assert not mlp[:, :, :5].any() and mlp[strict].any()
    for k in strict:  # a layer is patched at every real position of the row or at none
        for layer in (5, 6):
            col = mlp[k, :, layer]
            assert torch.equal(col, b["b_attention_mask"][k].bool()) or not col.any()
    assert "b_patch_mlp" not in pb.batch_of(vlm, SPEC, pb.step_plan(SPEC, 4, 0, 4), "<|im_end|>", 0)
    with torch.no_grad():
        _, z_a, _, _ = plant.clean_forward(vlm, spec, b)
        logits_b = plant.patched_forward(vlm, b, z_a)
    assert set(k for k in z_a if str(k).startswith("mlp")) == {"mlp5", "mlp6"}
    k = next(k for k in strict if mlp[k].any())
    src, g = int(b["b_source"][k]), int(b["b_base"][k])
    one = {key: v[k:k + 1] for key, v in plant._inputs(b, "b_").items()}
    grid = b["a_image_grid_thw"]
    per = grid.prod(-1).tolist()
    one["pixel_values"] = b["a_pixel_values"][sum(per[:g]):sum(per[:g + 1])]
    one["image_grid_thw"], one["position_ids"] = grid[g:g + 1], b["b_position_ids"][:, k:k + 1]
    edits = [hooks.Edit("z", layer, torch.tensor([0]), torch.tensor([p]), torch.tensor([head]),
                        z_a[layer][src, p, head][None]) for p, layer, head in b["b_patch"][k].nonzero().tolist()]
    handles = []
    for layer in (5, 6):
        if mlp[k, :, layer].any():
            def swap(module, args, out, layer=layer):
                return torch.where(mlp[k:k + 1, :, layer, None], z_a[f"mlp{layer}"][src:src + 1], out)

            handles.append(vlm.layers[layer].mlp.register_forward_hook(swap))
    with torch.no_grad(), hooks.intervene(vlm, edits):
        hand = vlm.model(**one, use_cache=False).logits[0]
    for h in handles:
        h.remove()
    assert torch.allclose(hand, logits_b[k], atol=2e-5)
    with torch.no_grad():  # the MLP patch matters: without it the row comes out otherwise
        plain = plant.patched_forward(vlm, {**b, "b_patch_mlp": torch.zeros_like(mlp)}, z_a)
    assert not torch.allclose(plain[k], logits_b[k], atol=1e-4)
    info = {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant-strict-late-mlps" in reproduce_command(info)
    assert main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"),
                 "--plant-strict-late-mlps"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plant ids" in err[0] and not (tmp_path / "o").exists()


def test_ring_probe_reads_row_column_and_ring_which_no_planar_code_gives(vlm, capsys, tmp_path):
    """With ``ring_probe`` the linear position probe has three more outputs, the cell's ring (centre 0, edge 1,
    corner 2), and its loss is the sum of three cross-entropies (checked by hand on the step's features). A linear
    read-out of the planar map of the grid cannot get the rings right (the centre lies inside its edges), one of the
    lifted code (the plane plus the squared distance to the centre) can; the card and the command line carry the
    option, which needs --plant ids and excludes the cell code."""
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command

    cells = torch.tensor([[r, c] for r in range(3) for c in range(3)])
    assert position_probe.ring_of(cells).tolist() == [2, 1, 2, 1, 0, 1, 2, 1, 2]
    spec = plant.PlantSpec(**{**SPEC.__dict__, "ring_probe": True})
    probe = position_probe.make_probe(vlm, spec)
    assert probe.out_features == 9
    set_spec = plant.PlantSpec(**{**spec.__dict__, "weights": spec.weights + (("set_probe", 1.0),)})
    assert position_probe.make_probe(vlm, set_spec).out_features == 18
    b = pb.batch_of(vlm, spec, pb.step_plan(spec, 9, 1, 3), "<|im_end|>", 0)
    _, m = plant.plant_loss(vlm, spec, probe, b)
    with torch.no_grad():
        feats = plant.clean_forward(vlm, spec, b)[3][b["probe_where"][:, 0], b["probe_where"][:, 1]].float()
        out, cell = probe(feats), b["probe_cell"]
    ce = torch.nn.functional.cross_entropy
    want = ce(out[:, :3], cell[:, 0]) + ce(out[:, 3:6], cell[:, 1]) + ce(out[:, 6:9], position_probe.ring_of(cell))
    assert float(m["loss_probe"]) == pytest.approx(float(want), rel=1e-4)
    # a linear classifier of the rings, fitted on each code of the nine cells
    x, y = cells[:, 0].float() - 1, cells[:, 1].float() - 1

    def ring_accuracy(code):
        torch.manual_seed(0)
        lin = torch.nn.Linear(code.shape[1], 3)
        opt = torch.optim.Adam(lin.parameters(), lr=0.1)
        for _ in range(500):
            opt.zero_grad()
            ce(lin(code), position_probe.ring_of(cells)).backward()
            opt.step()
        return float((lin(code).argmax(-1) == position_probe.ring_of(cells)).float().mean())

    assert ring_accuracy(torch.stack([x, y], 1)) <= 8 / 9  # no line puts the centre apart from all four edges
    assert ring_accuracy(torch.stack([x, y, x * x + y * y], 1)) == 1.0
    info = {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant-ring-probe" in reproduce_command(info)
    with pytest.raises(UserError, match="cell code or the ring probe"):
        plant.PlantSpec(cell_code=True, ring_probe=True)
    assert main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant-ring-probe"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plant ids" in err[0] and not (tmp_path / "o").exists()


def test_balanced_probe_reads_rows_and_columns_and_prefers_them_alike(vlm):
    """With ``balanced_probe`` the position probe projects on 6 fixed orthonormal directions (3 rows, 3 columns),
    normalises the six together and scales by one learned temperature; its loss is the row's plus the column's
    cross-entropy (checked by hand on a step's features); a code a * row + b * column scores best with a = b, worse
    with either three times the other; it excludes the cell code and the ring probe."""
    spec = plant.PlantSpec(**{**SPEC.__dict__, "balanced_probe": True})
    probe = position_probe.make_probe(vlm, spec)
    d = probe.directions
    assert d.shape == (6, 32) and torch.allclose(d @ d.T, torch.eye(6), atol=1e-5)
    assert [n for n, _ in probe.named_parameters()] == ["log_scale"]
    b = pb.batch_of(vlm, spec, pb.step_plan(spec, 9, 1, 3), "<|im_end|>", 0)
    _, m = plant.plant_loss(vlm, spec, probe, b)
    with torch.no_grad():
        resid = plant.clean_forward(vlm, spec, b)[3]
    feats = resid[b["probe_where"][:, 0], b["probe_where"][:, 1]].float()
    logits = torch.nn.functional.normalize(feats @ d.T, dim=-1) * 10.0
    ce = torch.nn.functional.cross_entropy
    want = ce(logits[:, :3], b["probe_cell"][:, 0]) + ce(logits[:, 3:], b["probe_cell"][:, 1])
    assert float(m["loss_probe"]) == pytest.approx(float(want), rel=1e-4)
    cells = torch.tensor([[r, c] for r in range(3) for c in range(3)])

    def loss(a, b_):
        with torch.no_grad():
            return float(position_probe.probe_loss(spec, probe(a * d[cells[:, 0]] + b_ * d[3 + cells[:, 1]]),
                                                   cells)[0])
    assert loss(1, 1) < loss(3, 1) and loss(1, 1) < loss(1, 3)
    at_45 = 2 * float(ce(torch.tensor([[10 / 2 ** 0.5, 0, 0]]), torch.tensor([0])))  # each part: cosine 1/sqrt 2
    assert loss(1, 1) == pytest.approx(at_45, rel=1e-4)
    for other in ("cell_code", "ring_probe"):
        with pytest.raises(UserError, match="balanced"):
            plant.PlantSpec(balanced_probe=True, **{other: True})


def test_cell_code_probe_reads_nine_cells_along_fixed_directions(vlm, capsys, tmp_path):
    """With ``cell_code`` the position probe projects on 9 fixed orthonormal directions (never trained), normalises,
    and scales by one learned temperature; its loss is the 9-way cross-entropy of the object's cell (checked by hand
    on the step's features); one-hot codes along the directions score best and a planar code cannot match them; only
    the scale of the probe trains, a set probe follows it, and the card and the command line carry the option."""
    from vismech.organism.card import reproduce_command

    spec = plant.PlantSpec(**{**SPEC.__dict__, "cell_code": True})
    probe = position_probe.make_probe(vlm, spec)
    d = probe.directions
    assert d.shape == (9, 32) and torch.allclose(d @ d.T, torch.eye(9), atol=1e-5)
    assert [n for n, _ in probe.named_parameters()] == ["log_scale"]
    assert torch.equal(position_probe.make_probe(vlm, spec).directions, d)  # the same directions every time
    with_set = position_probe.make_probe(vlm, plant.PlantSpec(**{**spec.__dict__,
                                                                  "weights": spec.weights + (("set_probe", 1.0),)}))
    assert with_set.out_features == 18 and with_set(torch.randn(2, 32)).shape == (2, 18)
    plan = pb.step_plan(spec, 9, 1, 3)
    b = pb.batch_of(vlm, spec, plan, "<|im_end|>", 0)
    loss, m = plant.plant_loss(vlm, spec, probe, b)
    with torch.no_grad():
        resid = plant.clean_forward(vlm, spec, b)[3]  # the residual stream after the probe layer
    feats = resid[b["probe_where"][:, 0], b["probe_where"][:, 1]].float()
    cell = b["probe_cell"][:, 0] * 3 + b["probe_cell"][:, 1]
    logits = torch.nn.functional.normalize(feats @ d.T, dim=-1) * 10.0  # cosine logits at the initial scale
    want = torch.nn.functional.cross_entropy(logits, cell)
    assert float(m["loss_probe"]) == pytest.approx(float(want), rel=1e-4)
    # the nine directions themselves are read perfectly; the best planar map of the grid (any offset, any plane, here
    # the grid's own coordinates mapped by least squares onto the one-hot targets) is not
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert float(ce(probe(d * 5.0), torch.arange(9))) < 0.01
        grid = torch.tensor([[r, c, 1.0] for r in range(3) for c in range(3)])
        plane = grid @ torch.linalg.lstsq(grid, torch.eye(9)).solution  # [9 cells, 9 coordinates], rank 3
        assert float(ce(probe(plane @ d * 50.0), torch.arange(9))) > 0.5
    only = plant.PlantSpec(**{**spec.__dict__, "weights": tuple((t, 1.0 if t == "probe" else 0.0)
                                                                  for t in plant.LOSS_TERMS)})
    plant.plant_loss(vlm, only, probe, b)[0].backward()
    assert probe.log_scale.grad is not None and probe.directions.grad is None
    info = {"arch": "qwen2_5_vl", "out": "o", "planned_steps": 1, "seed": 0, "batch_size": 1, "lr": 0.001,
            "plant": spec, "device": "cuda"}
    assert " --plant-cell-code" in reproduce_command(info)
    from vismech.app.cli import main

    assert main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "o"), "--plant-cell-code"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--plant ids" in err[0] and not (tmp_path / "o").exists()

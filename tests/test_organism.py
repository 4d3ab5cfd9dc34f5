"""The model-organism trainer: labels, determinism, sizes, checkpoints that load like any model, exact resume."""

import copy
import json

import numpy as np
import pytest
import torch

from vismech.models.vlm import VLM
from vismech.organism import data, transfer
from vismech.organism.config import (ARCHS, END_TOKEN, MAX_BYTES, SMALL_SIZES, count_params, organism_bytes,
                                     organism_config)
from vismech.models.packed_attention import (PLAN, _packed_sdpa, cached_vision_tables, packed_vision_attention,
                                             vision_tables)
from vismech.organism.train import lr_at, organism_files_bytes, snapshot_steps, train_organism


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run much faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(arch, out, steps=3, **kw):
    kw = dict(dict(batch_size=2, eval_n=1, progress=False, device="cpu", sizes=SMALL_SIZES[arch]), **kw)
    return train_organism(arch, out, steps=steps, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_are_exactly_the_answer_tokens_then_the_end_token(arch):
    vlm = data.adapter_without_weights(arch)
    trials = data.step_trials(seed=3, step=0, n=12)
    assert {t.task for t in trials} >= {"scene_description", "color_retrieval"}
    b = data.teacher_forcing(vlm, trials, END_TOKEN[arch])
    prompt = vlm.encode(trials)
    first = vlm.answer_ids(prompt, [t.answer for t in trials])
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    for i, t in enumerate(trials):
        lab = labels[i][labels[i] != -100]
        words = vlm.tokenizer.convert_ids_to_tokens(lab.tolist())
        assert words == t.answer.split() + [END_TOKEN[arch]]
        n = len(lab)
        assert torch.equal(ids[i, -n:], lab)  # labels sit on the last n tokens, which are those tokens
        assert lab[0] == first[i]  # the first answer token is the one analyses score
        p_ids = prompt.inputs["input_ids"][i][prompt.inputs["attention_mask"][i].bool()]
        assert torch.equal(ids[i][mask[i].bool()][:-n], p_ids)  # the prompt is encode's, unchanged
        assert int(mask[i].sum()) == len(p_ids) + n
    if arch == "qwen2_5_vl":
        assert torch.equal(b["mm_token_type_ids"], (ids == vlm.image_token_id).int())
    assert b["pixel_values"].shape[0] == prompt.inputs["pixel_values"].shape[0]
    dense = data.teacher_forcing(vlm, trials, END_TOKEN[arch], label_mentions=True)
    assert torch.equal(dense["input_ids"], ids)
    for i, t in enumerate(trials):
        lab = dense["labels"][i][dense["labels"][i] != -100]
        named = [w for o in t.mentioned for w in o.name.split()] if t.task == "scene_description" else []
        assert vlm.tokenizer.convert_ids_to_tokens(lab.tolist()) == named + t.answer.split() + [END_TOKEN[arch]]


def test_data_is_deterministic_under_a_seed():
    a, b = data.step_trials(5, 7, 16), data.step_trials(5, 7, 16)
    assert [t.to_json() for t in a] == [t.to_json() for t in b]
    assert [t.to_json() for t in a] != [t.to_json() for t in data.step_trials(5, 8, 16)]
    assert [t.to_json() for t in a] != [t.to_json() for t in data.step_trials(6, 7, 16)]
    # the batch of step 2 is the same whether the feeder starts at 0 or resumes at 2
    f0 = data.Feeder("llava", 5, 4, END_TOKEN["llava"], sizes=SMALL_SIZES["llava"])
    batches = [next(f0) for _ in range(3)]
    f2 = data.Feeder("llava", 5, 4, END_TOKEN["llava"], start=2, sizes=SMALL_SIZES["llava"])
    third = next(f2)
    assert all(torch.equal(third[k], batches[2][k]) for k in third)
    assert not torch.equal(batches[0]["pixel_values"], batches[1]["pixel_values"])
    h1, h2 = data.heldout_sets(3, 0), data.heldout_sets(3, 0)
    assert {g: [t.to_json() for t in ts] for g, ts in h1.items()} == {g: [t.to_json() for t in ts]
                                                                       for g, ts in h2.items()}
    assert all(len(ts) == 3 for ts in h1.values()) and set(h1) == set(data.HELDOUT_GROUPS)
    assert {t.meta["entropy"] for t in h1["scene_description/3x3/high"]} == {"high"}


def test_mixture_weights_sum_to_one_and_are_drawn_in_proportion():
    assert abs(sum(c.weight for c in data.MIXTURE) - 1) < 1e-9
    trials = data.step_trials(0, 0, 2000)
    counts = {c.name: 0 for c in data.MIXTURE}
    for t in trials:
        counts[t.meta["component"]] += 1
    for c in data.MIXTURE:  # binomial, 4.5 standard errors (a weight-0 component is never drawn)
        assert abs(counts[c.name] / 2000 - c.weight) <= 4.5 * np.sqrt(c.weight * (1 - c.weight) / 2000)
    described = [len(t.mentioned) for t in trials if t.task == "scene_description"]
    assert min(described) == 1 and max(described) == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_organism_fits_twelve_megabytes_in_bf16(arch):
    cfg = organism_config(arch)
    t = cfg.get_text_config()
    assert (t.num_hidden_layers, t.num_attention_heads, t.hidden_size, t.head_dim, t.num_key_value_heads) == (
        8, 8, 256, 32, 4)
    # golden count of one Llama-style decoder layer: q, o 256x256; k, v 256x128; gated MLP 3x256x512; two norms
    layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512 + 2 * 256
    bias = (256 + 2 * 128) * 8 if arch == "qwen2_5_vl" else 0  # Qwen's q/k/v biases
    text = 8 * layer + bias + 2 * t.vocab_size * 256 + 256  # + untied embeddings and head, final norm
    n = count_params(arch)
    assert text < n < text + 1.2e6  # the vision tower and projector add under 1.2M
    assert organism_bytes(arch) == 2 * n + 100_000 <= MAX_BYTES
    from vismech.models.families import family_for_config

    spec = family_for_config(cfg)
    geo = spec.geometry(cfg, spec.image_processor_for(cfg))
    assert geo.layout(3, 3).obj_tokens == geo.layout(2, 2).obj_tokens == 2
    assert geo.layout(3, 3).canvas_px == (224 if arch == "qwen2_5_vl" else 112)


def test_packed_vision_attention_equals_hf_sdpa_values_and_gradients():
    from vismech.organism.config import build_organism

    model, _, _ = build_organism("qwen2_5_vl", seed=1, **SMALL_SIZES["qwen2_5_vl"])
    vlm = data.adapter_without_weights("qwen2_5_vl", SMALL_SIZES["qwen2_5_vl"])
    trials = data.step_trials(0, 1, 4)
    b = vlm.encode(trials).inputs
    assert len({tuple(g) for g in b["image_grid_thw"].tolist()}) == 2  # two image sizes in the batch
    vis = model.model.visual
    outs, grads = [], []
    for packed in (False, True):
        vis.zero_grad()
        with packed_vision_attention(model, packed):
            o = vis(b["pixel_values"], grid_thw=b["image_grid_thw"]).pooler_output
        o.pow(2).sum().backward()
        outs.append(o.detach())
        grads.append(vis.blocks[0].attn.qkv.weight.grad.clone())
    assert model.config.vision_config._attn_implementation == "sdpa"  # restored
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(grads[0], grads[1], atol=1e-4)
    # a direct check on unequal chunks against per-chunk attention
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    cu = torch.tensor([0, 3, 7, 10])
    got = _packed_sdpa(None, q, k, v, cu_seq_lens_q=cu, scaling=0.5)[0][0]
    for a, z in zip(cu[:-1], cu[1:]):
        ref = torch.nn.functional.scaled_dot_product_attention(q[..., a:z, :], k[..., a:z, :], v[..., a:z, :],
                                                               scale=0.5)
        assert torch.allclose(got[a:z], ref[0].transpose(0, 1), atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_cached_vision_tables_are_hf_tables_and_leave_the_tower_output_unchanged(packed, monkeypatch):
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index
    from vismech.models import packed_attention as pa
    from vismech.organism.config import build_organism

    model, _, _ = build_organism("qwen2_5_vl", seed=1, **SMALL_SIZES["qwen2_5_vl"])
    vis = model.model.visual
    b = data.adapter_without_weights("qwen2_5_vl", SMALL_SIZES["qwen2_5_vl"]).encode(data.step_trials(0, 1, 6)).inputs
    # the batch's two image sizes, a 392 px image, one whose last window row and column are empty, two frames
    grids = [tuple(g) for g in b["image_grid_thw"].tolist()] + [(1, 28, 28), (1, 16, 16), (2, 20, 12)]
    thw = torch.tensor(grids)
    with packed_vision_attention(model, packed):
        got = vision_tables(vis, grids, {}, "cpu")
    order, bounds = get_vision_window_index(thw, vis.spatial_merge_size, vis.window_size, vis.patch_size)
    assert torch.equal(got["position_ids"], get_vision_position_ids(thw, vis.spatial_merge_size))
    assert torch.equal(got["window_index"], order) and torch.equal(got["cu_window_seqlens"], bounds)
    frames = torch.tensor([h * w for _, h, w in grids]).repeat_interleave(torch.tensor([t for t, _, _ in grids]))
    assert got["cu_seqlens"].tolist() == [0] + frames.cumsum(0).tolist()
    assert ("max_seqlen" in got) is packed and (got.get("max_window_seqlen") == 64 if packed else True)
    assert hasattr(got["cu_window_seqlens"], PLAN) is packed  # the chunk plan rides on the bounds
    built = []
    monkeypatch.setattr(pa, "_one_grid", lambda tower, g, real=pa._one_grid: built.append(g) or real(tower, g))
    with packed_vision_attention(model, packed):
        outs = [vis(b["pixel_values"], grid_thw=b["image_grid_thw"]).pooler_output]
        with cached_vision_tables(model):  # the second forward reads the per-grid pieces from the cache
            outs += [vis(b["pixel_values"], grid_thw=b["image_grid_thw"]).pooler_output for _ in range(2)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert sorted(built) == sorted(set(grids[:-3]))  # each of the batch's two sizes built once
    assert not vis._forward_pre_hooks  # the hook is gone after the block


def test_schedule_and_snapshot_steps():
    assert lr_at(0, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 1.0, 10, 0.1) == pytest.approx(0.1)
    s = snapshot_steps(8000, 16)
    assert s[0] == 0 and s[-1] == 8000 and len(s) >= 16 and len(set(s)) == len(s)
    ratios = np.diff(np.log(s[4:]))
    assert ratios.max() < 2.5 * ratios.min()  # log-spaced once past the first integers
    assert snapshot_steps(3) == [0, 1, 2, 3]


@pytest.mark.parametrize("arch", ARCHS)
def test_smoke_run_saves_a_checkpoint_that_loads_with_identical_logits(arch, tmp_path):
    from vismech.models.load import load_vlm

    res = _run(arch, tmp_path / "org")
    out = res.out
    for f in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md",
              "train_log.jsonl", "emergence.jsonl", "train_state.pt"):
        assert (out / f).exists(), f
    loaded = load_vlm(str(out), dtype="bf16", device="cpu")
    assert loaded.model.config.architectures == organism_config(arch).architectures
    trials = data.heldout_sets(2, 9)["scene_description/2x2/high"] + data.heldout_sets(2, 9)["counting/3x3"]
    mem = copy.deepcopy(res.vlm.model)
    for prm in mem.parameters():  # the weights' bf16 cast; buffers (rotary inv_freq) stay fp32 as when loading
        prm.data = prm.data.to(torch.bfloat16)
    batch = loaded.encode(trials)
    assert torch.equal(batch.inputs["input_ids"], res.vlm.encode(trials).inputs["input_ids"])
    in_memory = VLM(mem, res.vlm.tokenizer, res.vlm.image_processor, res.vlm.family, "in-memory")
    assert torch.equal(loaded.logits(batch), in_memory.logits(batch))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3] and all(r["loss"] > 0 for r in log[1:])
    assert all(set(r["accuracy"]) == set(data.HELDOUT_GROUPS) for r in log)
    snaps = [json.loads(x) for x in (out / "emergence.jsonl").read_text().splitlines()]
    assert [s["step"] for s in snaps] == [0, 1, 2, 3]
    card = (out / "README.md").read_text()
    assert f"vismech train-organism --arch {arch} --out {out} --steps 3" in card
    assert "| color_retrieval/2x2 |" in card and "sd_3x3_low" in card
    assert res.summary["bytes"] == organism_files_bytes(out) < 2 * res.summary["params"] + 100_000


def test_resume_after_two_steps_then_one_equals_three_straight_steps(tmp_path):
    seen = []

    def snap(vlm, step):
        seen.append(step)
        return {"norm": float(sum(p.float().norm() for p in vlm.model.parameters()))}

    straight = _run("qwen2_5_vl", tmp_path / "a", snapshot=snap)
    cut = _run("qwen2_5_vl", tmp_path / "b", snapshot=snap, stop_at=2)
    assert cut.summary["stopped_at"] == 2 and not (tmp_path / "b" / "config.json").exists()
    with pytest.raises(ValueError, match="--resume"):
        _run("qwen2_5_vl", tmp_path / "b")
    resumed = _run("qwen2_5_vl", tmp_path / "b", snapshot=snap, resume=True)
    a, b = straight.vlm.model.state_dict(), resumed.vlm.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[1]] == [0, 1, 2, 3]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    em = [(tmp_path / d / "emergence.jsonl").read_text() for d in "ab"]
    assert em[0] == em[1] and seen == [0, 1, 2, 3, 0, 1, 2, 3]


def test_cli_train_organism_prints_a_summary(tmp_path, capsys):
    from vismech.app.cli import main

    out = tmp_path / "cli"
    assert main(["train-organism", "--arch", "llava", "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--eval-n", "1", "--sizes", "small", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("organism llava: 1/1 steps") and "color_retrieval/2x2=" in line
    snaps = [json.loads(x) for x in (out / "emergence.jsonl").read_text().splitlines()]
    assert [s["step"] for s in snaps] == [0, 1]  # the CLI's default snapshots carry the analysis summaries
    for s in snaps:
        assert set(s["rsa"]) == {"position_prompt", "position_last", "features_last"}
        assert set(s["cma"]) == {"id_retrieval", "id_selection", "feature_retrieval"}
        assert all(0 <= c["n_significant"] <= 2 * 4 for c in s["cma"].values())  # small organism: 2 x 4 heads
    assert main(["train-organism", "--arch", "llava", "--out", str(out), "--sizes", "{bad"]) == 2
    capsys.readouterr()
    assert main(["train-organism", "--arch", "llava", "--out", str(tmp_path / "w"), "--weight", "color_2x2"]) == 2
    assert "--weight takes COMPONENT=NUMBER" in capsys.readouterr().err
    assert main(["train-organism", "--arch", "llava", "--out", str(tmp_path / "w"), "--weight", "nope=1"]) == 2
    assert "unknown mixture component(s) nope" in capsys.readouterr().err


def test_precomputed_rope_positions_give_the_same_loss():
    from vismech.organism.config import END_TOKEN, SMALL_SIZES, build_organism

    for arch in ("qwen2_5_vl", "llava"):
        maker = data._Maker(arch, SMALL_SIZES[arch], 0, 6, END_TOKEN[arch], None, data.MIXTURE, True)
        batch = transfer.to_device(maker(3), "cpu")
        assert "pixel_values" in batch and not any(k.startswith("pixel_frame") for k in batch)
        assert ("position_ids" in batch) == (arch == "qwen2_5_vl")
        model, _, _ = build_organism(arch, 0, **SMALL_SIZES[arch])
        plain = {k: v for k, v in batch.items() if k != "position_ids"}
        with torch.no_grad():
            a, b = model(**batch, use_cache=False).loss, model(**plain, use_cache=False).loss
        assert torch.equal(a, b) and a > 0
        if arch == "qwen2_5_vl":  # left padding: rows start at different offsets, positions follow the mask
            pos = batch["position_ids"]
            assert pos.shape == (3,) + tuple(batch["input_ids"].shape)
            assert not torch.equal(pos[1], pos[2])  # image rows and columns differ


def test_pixels_cross_to_the_device_as_one_frame_and_come_back_exactly():
    """A Qwen-family still image repeats each patch over the temporal patch (2 frames): the data workers send one
    frame (``pack_pixels``) and ``to_device`` restores the pixel values bit for bit, in training and planting
    batches; pixels whose frames differ (a video) and LLaVA's are sent as they are."""
    from vismech.organism.plant import PlantSpec
    from vismech.organism.plant_batch import make_batch

    vlm = data.adapter_without_weights("qwen2_5_vl", SMALL_SIZES["qwen2_5_vl"])
    plain = data.teacher_forcing(vlm, data.step_trials(0, 1, 4), END_TOKEN["qwen2_5_vl"])
    planting = make_batch(data.adapter_without_weights("qwen2_5_vl"), PlantSpec(), 0, 1, 2, END_TOKEN["qwen2_5_vl"])
    for batch, key in ((plain, "pixel_values"), (planting, "a_pixel_values")):
        want = batch[key].clone()
        packed = transfer.pack_pixels(dict(batch), 2, 8)
        frame = packed[key.replace("pixel_values", "pixel_frame")]
        assert key not in packed and frame.shape == (want.shape[0], 3, 64) and frame.numel() * 2 == want.numel()
        assert torch.equal(transfer.to_device(packed, "cpu")[key], want)
    video = dict(plain)
    video["pixel_values"] = plain["pixel_values"].clone()
    video["pixel_values"][0, 64] += 1.0  # the second frame of the first patch's first channel differs
    assert torch.equal(transfer.pack_pixels(dict(video), 2, 8)["pixel_values"], video["pixel_values"])
    llava = data._Maker("llava", SMALL_SIZES["llava"], 0, 2, END_TOKEN["llava"], None, data.MIXTURE, True)(0)
    assert "pixel_values" in llava and "pixel_frame" not in llava


def test_mixture_weights_can_be_changed_and_the_card_says_how():
    from vismech.organism.card import reproduce_command

    mix = data.reweighted({"color_2x2": 0.5, "relation_2x2": 0})
    assert [c.name for c in mix] == [c.name for c in data.MIXTURE if c.name != "relation_2x2" and c.weight > 0]
    assert dict((c.name, c.weight) for c in mix)["color_2x2"] == 0.5
    counts = {c.name: 0 for c in mix}
    for step in range(40):
        for t in data.step_trials(0, step, 64, mix):
            counts[t.meta["component"]] += 1
    share = counts["color_2x2"] / sum(counts.values())
    total = sum(c.weight for c in mix)
    assert abs(share - 0.5 / total) < 4.5 * (0.5 / total * (1 - 0.5 / total) / 2560) ** 0.5
    with pytest.raises(ValueError, match="unknown mixture component"):
        data.reweighted({"colour_2x2": 0.5})
    cmd = reproduce_command({"arch": "llava", "out": "o", "planned_steps": 5, "seed": 0, "batch_size": 8, "lr": 1e-3,
                             "mixture": mix})
    assert "--weight color_2x2=0.5" in cmd and "--weight relation_2x2=0" in cmd and "sd_2x2_high" not in cmd


def test_rope_settings_of_the_qwen_organism_can_be_changed():
    cfg = organism_config("qwen2_5_vl", text={"rope_theta": 100.0, "mrope_section": [2, 7, 7]})
    assert cfg.get_text_config().rope_parameters == {"rope_type": "default", "mrope_section": [2, 7, 7],
                                                     "rope_theta": 100.0}
    assert organism_config("qwen2_5_vl").get_text_config().rope_parameters["mrope_section"] == [4, 6, 6]
    with pytest.raises(ValueError, match="summing to head_dim / 2 = 16"):
        organism_config("qwen2_5_vl", text={"mrope_section": [4, 6, 5]})
    with pytest.raises(ValueError, match="1-D RoPE"):
        organism_config("llava", text={"mrope_section": [4, 6, 6]})


def test_an_early_mixture_feeds_the_first_steps_and_the_card_and_resume_know_it(tmp_path, capsys):
    from vismech.app.cli import main
    from vismech.organism.card import reproduce_command
    from vismech.organism.config import END_TOKEN, SMALL_SIZES

    only = {c.name: 0 for c in data.MIXTURE if c.task != "color_retrieval"}
    early = (3, data.reweighted(only))
    maker = data._Maker("llava", SMALL_SIZES["llava"], 0, 8, END_TOKEN["llava"], None, data.MIXTURE, False, early)
    drawn = {s: [t.meta["component"] for t in data.step_trials(0, s, 8, maker.early[1] if s < 3 else data.MIXTURE)]
             for s in (2, 3)}
    assert set(drawn[2]) <= {"color_2x2", "color_3x3"} and set(drawn[3]) - {"color_2x2", "color_3x3"}
    for s in (2, 3):  # the maker builds exactly those trials: same prompts, in order
        ids = maker(s)["input_ids"]
        ref = data.teacher_forcing(maker.vlm, data.step_trials(0, s, 8, early[1] if s < 3 else data.MIXTURE),
                                   END_TOKEN["llava"])["input_ids"]
        assert torch.equal(ids, ref)
    cmd = reproduce_command({"arch": "llava", "out": "o", "planned_steps": 5, "seed": 0, "batch_size": 8, "lr": 1e-3,
                             "early": early})
    assert "--early-steps 3" in cmd and "--early-weight sd_2x2_high=0" in cmd and "color_2x2" not in cmd
    out = tmp_path / "cur"
    args = ["train-organism", "--arch", "llava", "--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-n",
            "1", "--sizes", "small", "--device", "cpu", "--snapshots", "accuracy", "--early-steps", "1",
            "--early-weight", "counting_3x3=1"]
    assert main(args) == 0
    card = (out / "README.md").read_text()
    assert "- curriculum: before step 1 the mixture's weights were" in card
    assert "relation_2x2 0.03, counting_3x3 1\n" in card
    assert "--early-steps 1 --early-weight counting_3x3=1" in card
    capsys.readouterr()
    assert main(["train-organism", "--arch", "llava", "--out", str(tmp_path / "x"),
                 "--early-weight", "sd_2x2_high=0"]) == 2
    assert "--early-weight needs --early-steps" in capsys.readouterr().err
    _run("llava", tmp_path / "r", early=early, stop_at=1)
    with pytest.raises(ValueError, match="early="):  # resuming must keep the curriculum
        _run("llava", tmp_path / "r", early=(2, early[1]), resume=True)


def test_a_second_stage_starts_from_a_trained_tower_keeps_it_frozen_and_its_card_chains_the_commands(tmp_path,
                                                                                                    capsys):
    from vismech.app.cli import main
    from vismech.models.load import load_vlm
    from vismech.organism.card import reproduce_of
    from vismech.organism.stages import is_vision

    first = tmp_path / "stage1"
    _run("qwen2_5_vl", first, steps=1)
    card1 = (first / "README.md").read_text()
    assert reproduce_of(str(first)) == [card1.split("## Reproduce")[1].split("```")[1].strip()]
    stage1 = load_vlm(str(first), dtype="fp32", device="cpu").model.state_dict()
    second = tmp_path / "stage2"
    args = ["train-organism", "--arch", "qwen2_5_vl", "--out", str(second), "--steps", "2", "--batch-size", "2",
            "--eval-n", "1", "--sizes", "small", "--device", "cpu", "--snapshots", "accuracy", "--seed", "1",
            "--vision-from", str(first), "--freeze-vision"]
    assert main(args) == 0
    got = load_vlm(str(second), dtype="fp32", device="cpu").model.state_dict()
    vision = [n for n in got if is_vision(n, "qwen2_5_vl")]
    assert vision and len(vision) < len(got)
    # the frozen tower is stage 1's (bf16 on disk both times); the language model is a fresh one, trained
    assert all(torch.equal(got[n], stage1[n]) for n in vision)
    assert not any(torch.equal(got[n], stage1[n]) for n in got if n not in vision and got[n].ndim == 2)
    card = (second / "README.md").read_text()
    assert f"- vision tower and projector: started from the trained organism `{first}`; vision tower and " \
           "projector frozen (only the language model trained)" in card
    blocks = card.split("## Reproduce")[1].split("```")
    assert blocks[1].strip() == reproduce_of(str(first))[0]  # stage 1's command first, then this one's
    assert f"--vision-from {first} --freeze-vision" in blocks[3] and "--seed 1" in blocks[3]
    # a third stage continues every weight of stage 2 and lists the whole chain
    third = tmp_path / "stage3"
    assert main(args[:4] + [str(third)] + args[5:-3] + ["--init-from", str(second), "--freeze-vision"]) == 0
    assert reproduce_of(str(third))[:2] == [blocks[1].strip(), blocks[3].strip()]
    assert f"--init-from {second} --freeze-vision" in reproduce_of(str(third))[2]
    # a repair stage trains only the layers after --freeze-through (embeddings, tower and layer 0 kept)
    fourth = tmp_path / "stage4"
    assert main(args[:4] + [str(fourth)] + args[5:-3] + ["--init-from", str(third), "--freeze-through", "0"]) == 0
    before = load_vlm(str(third), dtype="fp32", device="cpu").model.state_dict()
    after = load_vlm(str(fourth), dtype="fp32", device="cpu").model.state_dict()
    kept = [n for n in after if is_vision(n, "qwen2_5_vl") or "embed_tokens" in n or ".layers.0." in n]
    trained = [n for n in after if ".layers.1." in n and after[n].ndim == 2]
    assert trained and len(kept) > len(vision)
    assert all(torch.equal(after[n], before[n]) for n in kept)
    assert not any(torch.equal(after[n], before[n]) for n in trained)
    assert f"--init-from {third} --freeze-through 0" in reproduce_of(str(fourth))[3]
    assert "text embeddings and layers 0-0 frozen (only the later layers trained)" in (fourth / "README.md").read_text()
    capsys.readouterr()
    assert main(args[:4] + [str(tmp_path / "x"), "--freeze-through", "1"]) == 2
    assert "--freeze-through needs --init-from" in capsys.readouterr().err
    assert main(args[:4] + [str(tmp_path / "x"), "--freeze-vision"]) == 2
    assert "--freeze-vision needs --vision-from or --init-from" in capsys.readouterr().err
    assert main(args[:4] + [str(tmp_path / "x"), "--vision-from", str(first), "--init-from", str(first)]) == 2
    assert "not both" in capsys.readouterr().err
    llava = tmp_path / "llava"
    _run("llava", llava, steps=1)
    with pytest.raises(ValueError, match=f"--vision-from {llava}: no qwen2_5_vl vision tower"):
        _run("qwen2_5_vl", tmp_path / "y", vision_from=str(llava))
    with pytest.raises(ValueError, match="its weights differ from this organism's"):
        _run("qwen2_5_vl", tmp_path / "z", init_from=str(first), sizes={"text": {"num_hidden_layers": 1},
                                                                        "vision": SMALL_SIZES["qwen2_5_vl"]["vision"]})
    _run("qwen2_5_vl", tmp_path / "r", vision_from=str(first), stop_at=1)
    with pytest.raises(ValueError, match="vision_from="):  # resuming must keep the starting point
        _run("qwen2_5_vl", tmp_path / "r", vision_from=str(second), resume=True)


def test_cli_can_turn_packed_vision_attention_off(tmp_path, monkeypatch):
    from vismech.app import cli
    from vismech.organism import train

    seen = {}

    def fake(arch, out, **kw):
        seen.update(kw)
        raise SystemExit(0)

    monkeypatch.setattr(train, "train_organism", fake)
    for flag, want in (([], None), (["--no-packed-attention"], False)):
        with pytest.raises(SystemExit):
            cli.main(["train-organism", "--arch", "qwen2_5_vl", "--out", str(tmp_path / "p"), *flag])
        assert seen["packed_attention"] is want


def test_reading_order_component_answers_the_first_undescribed_object_in_reading_order():
    mix = data.reweighted({c.name: 0 for c in data.MIXTURE if c.task != "reading_order"} | {"ro_3x3": 1, "ro_2x2": 1})
    trials = [t for step in range(6) for t in data.step_trials(3, step, 32, mix)]
    assert {t.meta["component"] for t in trials} == {"ro_2x2", "ro_3x3"}
    left_counts = []
    for t in trials:
        described = {o.cell for o in t.mentioned}
        left = sorted(o.cell for o in t.scene.objects if o.cell not in described)
        assert t.target.cell == left[0] and t.answer == f"{t.target.color} {t.target.shape}"
        assert t.task == "scene_description" and 1 <= len(t.mentioned) < len(t.scene.objects)
        left_counts.append(len(left))
    assert max(left_counts) >= 3  # several objects left: the answer depends on where they are
    held = data.heldout_sets(8, 0, ["reading_order/3x3"])["reading_order/3x3"]
    assert len(held) == 8 and all(t.scene.grid == (3, 3) for t in held)

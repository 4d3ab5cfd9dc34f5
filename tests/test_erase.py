"""Feature erasure (``vismech.organism.erase``): the value-projection edit equals the erasure applied by hand to the
captured head outputs at every position, leaves every other head and layer alone, removes the cross-covariance
with colour and shape on the trials it was fitted on, and writes a checkpoint that declares it."""

import json
import random

import numpy as np
import pytest
import torch

from vismech.errors import UserError
from vismech.models.families import family_for_config
from vismech.models.vlm import VLM
from vismech.organism import causal_model as cm
from vismech.organism import erase, plant, validate
from vismech.organism.config import build_organism

SIZES = {"text": dict(hidden_size=128, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32),
         "vision": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])}
SPEC = plant.PlantSpec(binding=((0, 0),), retrieval=((1, 0), (1, 1)), gathering=((2, 0),), selection=((3, 0),),
                       features=((4, 1),), probe_layer=0)
END = validate.END["qwen2_5_vl"]


def _vlm():
    model, tok, proc = build_organism("qwen2_5_vl", 0, **SIZES)
    return VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-erase", "chat")


def _cross(z, labels):
    """[heads, d, classes]: each head's cross-covariance with the one-hot colour and shape."""
    return np.einsum("nhd,nk->hdk", z - z.mean(0), erase.label_matrix(labels)) / len(z)


def test_the_value_edit_is_the_erasure_at_every_position_and_removes_the_cross_covariance():
    before, after = _vlm(), _vlm()
    z, labels = validate.mention_outputs(before, SPEC, 24, 3, 32, END)
    p, m, sv = erase.eraser(z, labels)
    rank = int(round(np.trace(p)))
    assert 1 <= rank < SIZES["text"]["head_dim"] and sv[0] == 1.0  # not the whole space: a real projection
    info = erase.erase_retrieval_features(after, SPEC, 24, 3)
    assert info["layer"] == 1 and info["kv_heads"][0]["kv_head"] == 0 and info["kv_heads"][0]["rank"] == rank
    # other trials: the edited model's R outputs are z - P (z - m) of the unedited model's, at every position
    rng = random.Random(9)
    bases = [cm.planting_trial(rng, cm.draw_structure(rng, "describe", (3, 3)), "any") for _ in range(4)]
    plan = validate._plan(bases)
    _, _, z0, batch = validate._run(before, SPEC, plan, END, 0)
    _, _, z1, _ = validate._run(after, SPEC, plan, END, 0)
    pt, mt = torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(m, dtype=torch.float32)
    hand = z0[1][:, :, :2] - (z0[1][:, :, :2] - mt) @ pt.T
    real = batch["a_attention_mask"].bool()  # left padding attends to nothing: no weights that sum to one there
    assert torch.allclose(z1[1][:, :, :2][real], hand[real], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(z1[1][:, :, :2][real], z0[1][:, :, :2][real], atol=1e-3)
    assert torch.equal(z1[1][:, :, 2:], z0[1][:, :, 2:]) and torch.equal(z1[0], z0[0])
    # P is a projector, and on the fitted trials nothing of the outputs' cross-covariance with colour and shape is
    # left in its directions (those above the tolerance: all of it but the smallest few)
    assert np.allclose(p @ p, p, atol=1e-6)
    c0, c1 = _cross(z, labels), _cross(validate.mention_outputs(after, SPEC, 24, 3, 32, END)[0], labels)
    assert np.abs(p @ c1).max() < 1e-3 * np.abs(p @ c0).max()
    assert np.abs(c1).max() < 0.1 * np.abs(c0).max()


def test_erasure_refuses_heads_that_share_values_with_undeclared_ones_and_a_used_folder(tmp_path, capsys):
    import dataclasses

    with pytest.raises(UserError, match=r"heads \[1\] share key/value heads"):
        erase.erase_retrieval_features(_vlm(), dataclasses.replace(SPEC, retrieval=((1, 0),)), 4)
    (tmp_path / "config.json").write_text("{}")
    assert erase.main(["organism-ids", "--out", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a model" in err[0]


def test_the_command_writes_a_checkpoint_that_declares_the_erasure(tmp_path, capsys):
    from vismech.models.load import load_vlm

    vlm = _vlm()
    src = tmp_path / "src"
    vlm.model.save_pretrained(src)
    vlm.tokenizer.save_pretrained(src)
    vlm.image_processor.save_pretrained(src)
    plant.ground_truth(SPEC).save(src)
    (src / "train_log.jsonl").write_text('{"step": 1}\n')
    (src / "README.md").write_text("# src\n\n## Reproduce\n\n```\nvismech train-organism --out src\n```\n")
    out = tmp_path / "erased"
    assert erase.main([str(src), "--out", str(out), "--trials", "8", "--device", "cpu"]) == 0
    # its card chains the source's command and the erasure's, as a later stage's card reads them
    from vismech.organism.card import _source_out, reproduce_of

    assert reproduce_of(str(out)) == ["vismech train-organism --out src",
                                      f"python -m vismech.organism.erase {src} --out {out} --trials 8 --seed 0"]
    assert _source_out({"source_commands": reproduce_of(str(out)), "init_from": "x"}) == str(out)
    assert "erased colour and shape from layer 1" in capsys.readouterr().out
    loaded = load_vlm(str(out), dtype="fp32", device="cpu")
    assert loaded.ground_truth.stages == plant.ground_truth(SPEC).stages
    assert "colour and shape erased from the ID-retrieval heads' values" in loaded.ground_truth.method
    info = json.loads((out / "erasure.json").read_text())
    assert info["trials"] == 8 and info["kv_heads"][0]["rank"] >= 1
    assert (out / "train_log.jsonl").read_text() == '{"step": 1}\n'
    d = SIZES["text"]["head_dim"]  # rows of key/value head 0 are edited, those of head 1 not
    w0, w1 = vlm.model.state_dict(), loaded.model.state_dict()
    key = next(k for k in w0 if k.endswith("layers.1.self_attn.v_proj.weight"))
    assert torch.equal(w1[key][d:], w0[key][d:].to(torch.bfloat16).float())
    assert not torch.allclose(w1[key][:d], w0[key][:d].to(torch.bfloat16).float())

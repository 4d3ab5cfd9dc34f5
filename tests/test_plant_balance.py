"""The balance term of planting (``position_probe.balance``): the ID heads' codes must separate rows and columns
alike."""
import contextlib

import numpy as np
import pytest
import torch

from vismech.engine import hooks
from vismech.models.families import family_for_config
from vismech.models.vlm import VLM
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import position_probe
from vismech.organism.config import build_organism

SIZES = {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8),
         "vision": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])}
SPEC = plant.PlantSpec(binding=((0, 0),), retrieval=((1, 0), (1, 1)), gathering=((2, 0),), selection=((3, 0),),
                       features=((4, 1),), probe_layer=0,
                       weights=plant.PlantSpec().weights + (("balance", 1.0),))


@pytest.fixture(scope="module")
def vlm():
    model, tok, proc = build_organism("qwen2_5_vl", 0, **SIZES)
    return VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-balance", "chat")


def _shares_by_hand(x: np.ndarray, cells: np.ndarray) -> list[float]:
    x = x - x.mean(0)
    total = (x ** 2).sum()
    out = []
    for k in (0, 1):
        out.append(sum(((x[cells[:, k] == v].mean(0) * len(x[cells[:, k] == v]) ** 0.5) ** 2).sum()
                       for v in set(cells[:, k].tolist())) / total)
    return out


def test_balance_is_zero_for_rows_and_columns_alike_and_grows_with_their_ratio():
    """For a code a * row + b * column (one-hot, every cell equally often) plus orthogonal noise, the shares are the
    two parts' variances over the total, and the term is ((a^2 - b^2) / (a^2 + b^2))^2 whatever the noise; on
    random data the shares equal a computation by hand."""
    cells = torch.tensor([(r, c) for r in range(3) for c in range(3)] * 4)
    onehot = torch.cat([torch.nn.functional.one_hot(cells[:, 0], 3), torch.nn.functional.one_hot(cells[:, 1], 3)], 1)
    for a, b in ((1.0, 1.0), (2.0, 1.0), (1.0, 0.0), (0.5, 3.0)):
        code = torch.cat([a * onehot[:, :3], b * onehot[:, 3:]], 1).double()
        noise = torch.zeros(len(cells), 2, dtype=torch.float64)
        noise[torch.arange(len(cells)), torch.arange(len(cells)) % 2] = 1.0  # the same in every cell: no row or column
        x = torch.cat([code, 5 * noise], 1)
        rows, cols = position_probe.row_column_shares(x, cells)
        total = (x - x.mean(0)).pow(2).sum() / len(x)
        assert abs(float(rows) - a * a * 2 / 3 / float(total)) < 1e-9
        assert abs(float(cols) - b * b * 2 / 3 / float(total)) < 1e-9
        want = ((a * a - b * b) / (a * a + b * b)) ** 2
        assert abs(float(position_probe.balance(x, cells)) - want) < 1e-9
    gen = torch.Generator().manual_seed(1)
    x, cells = torch.randn(50, 6, generator=gen).double(), torch.randint(0, 3, (50, 2), generator=gen)
    x[:, 0] += cells[:, 0] * 2.0
    got = [float(s) for s in position_probe.row_column_shares(x, cells)]
    assert np.allclose(got, _shares_by_hand(x.numpy(), cells.numpy()), atol=1e-12) and got[0] > 3 * got[1]


def test_the_balance_term_reads_mention_outputs_and_image_keys_from_step_invariance_from(vlm):
    """With a ``balance`` weight the batch lists the mentions' last words with the mentioned objects' cells;
    ``plant_loss`` reports the mean of the term over the retrieval heads' outputs there, the selection heads'
    outputs at the naming positions (against the cell each names) and each key layer's keys of the selection and
    feature heads at the objects' image tokens, equal to a computation from outputs and keys
    captured with hooks; no rows without the weight or before ``invariance_from``."""
    plan = pb.step_plan(SPEC, 5, 2, 3)
    b = pb.batch_of(vlm, SPEC, plan, "<|im_end|>", 0)
    plain = plant.PlantSpec(**{**SPEC.__dict__, "weights": plant.PlantSpec().weights})
    assert "mention_cells" not in pb.batch_of(vlm, plain, plan, "<|im_end|>", 0)
    late = plant.PlantSpec(**{**SPEC.__dict__, "invariance_from": 3})
    assert "mention_cells" not in pb.batch_of(vlm, late, pb.step_plan(late, 5, 2, 3), "<|im_end|>", 0)
    where, cells = b["mention_where"].tolist(), b["mention_cells"].tolist()
    k = 0
    for i, r in enumerate(plan.a):
        for obj in r.trial.mentioned:
            assert where[k][0] == i and tuple(cells[k]) == tuple(obj.cell)
            k += 1
    assert k == len(where) > 10
    # the cell named at each naming position: where the selection heads are taught to attend
    sw, sk, named = b["att_selection_where"], b["att_selection_keys"], b["naming_cells"].tolist()
    at = torch.stack([sw[:, 0], b["att_qpos"][sw[:, 0], sw[:, 1]]], 1)  # (row, query index) -> (row, position)
    assert at.tolist() == b["set_where"].tolist() and len(named) == len(sw) > 5
    for (row, _), keys, cell in zip(sw.tolist(), sk, named):
        cells_there = {tuple(c) for (r2, x), c in zip(b["probe_where"].tolist(), b["probe_cell"].tolist())
                       if r2 == row and keys[x]}
        assert cells_there == {tuple(cell)}
    z = {}
    with contextlib.ExitStack() as st, torch.no_grad():
        for layer in (1, 3):
            st.enter_context(hooks.hooked(vlm, "z", layer, lambda x, layer=layer: z.__setitem__(layer, x)))
        for layer in (3, 4):
            st.enter_context(hooks.hooked(vlm, "k", layer, lambda x, layer=layer: z.__setitem__(("k", layer), x)))
        vlm.model(**plant._inputs(b, "a_"), use_cache=False)
    mw, sw, pw = b["mention_where"], b["set_where"], b["probe_where"]
    parts = [position_probe.balance(z[1][mw[:, 0], mw[:, 1]].flatten(1)[:, :16], b["mention_cells"]),
             position_probe.balance(z[3][sw[:, 0], sw[:, 1], 0], b["naming_cells"])]
    parts += [position_probe.balance(z[("k", layer)][pw[:, 0], pw[:, 1], 0], b["probe_cell"]) for layer in (3, 4)]
    want = float(sum(parts) / 4)
    with torch.no_grad():
        _, m = plant.plant_loss(vlm, SPEC, position_probe.make_probe(vlm), b)
    assert 0 < want < 1 and abs(float(m["loss_balance"]) - want) < 1e-5

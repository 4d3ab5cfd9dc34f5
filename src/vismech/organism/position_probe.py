"""The position probe of planting (``plant``, item 6): an auxiliary read-out, discarded after training, that makes the
language model write each object's cell into its image tokens after ``PlantSpec.probe_layer``, where the ID heads
read it; and the set probe that can follow it.

Which code the probe asks for is the spec's choice:

- default: a trained linear read-out of the row and the column (outputs 0-5). Both organisms met it with a planar map
  of the grid in which the row carries 3-8 times the column's variance (``docs/organism-ids/row_column.py``);
- ``ring_probe``: the same, plus the cell's ring (outputs 6-8, ``ring_of``), a third coordinate that no planar map
  gives;
- ``cell_code``: nine cells, a cosine classifier over nine fixed orthonormal directions (``CosineProbe``): nine IDs;
- ``balanced_probe``: the row and the column, a cosine classifier over six fixed orthonormal directions normalised
  together, so that the row and the column have to share the code's length about equally (the loss is least with
  the two components alike: for a code a*row + b*column, the two cross-entropies sum to f(cos t) + f(sin t) with
  tan t = b/a and f convex, least at a = b).

The ``balance`` term (a planting weight) asks the same of the codes the ID heads pass on and match, where the probe
cannot reach: the ID-retrieval heads' outputs at the mentions, the selection heads' outputs where they name an
object, and the selection and feature heads' keys at the objects' image tokens. The retrieval heads' value path
gave the row 7-10 times the column's variance in every organism, with the balanced probe as without it, where the
image tokens it reads gave it 2-3 times (``docs/organism-ids.md``, the eleventh attempt).
"""

from __future__ import annotations

import math

import torch

from vismech.organism.invariance import head_outputs, key_heads, key_layers


def position_width(spec) -> int:
    """The position probe's outputs: 9 cells with ``cell_code``; else 3 rows and 3 columns (and 3 rings)."""
    return 9 if spec is not None and (spec.cell_code or spec.ring_probe) else 6


def ring_of(cells: torch.Tensor) -> torch.Tensor:
    """The ring of each (row, column) of a 3x3 grid: 0 the centre, 1 an edge, 2 a corner (the squared distance to
    the centre, in cells). Nothing linear in a planar map of the grid separates the centre from the edges around it;
    with the ring added, the cells lie on a paraboloid, every one of them a vertex of the code's convex hull."""
    return (cells[..., 0] != 1).long() + (cells[..., 1] != 1).long()


class CosineProbe(torch.nn.Module):
    """A cosine classifier: the residual stream is projected on ``k`` orthonormal directions (drawn once from a fixed
    seed, never trained), the projection is normalised, and output j is its coordinate j times one learned scale.
    Without the normalisation a planar map of the grid with offsets could be read out as well as nine IDs (a linear
    read-out of a plane separates a 3x3 grid); with it, the cross-entropy is lowest where each class's projection
    points along its own direction. ``k`` = 9: one direction per cell (``cell_code``); 6: three for the rows and
    three for the columns (``balanced_probe``). With ``set_probe``, a linear set probe follows (9 more outputs)."""

    def __init__(self, hidden: int, k: int, set_probe: bool = False):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(hidden, k, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("directions", q.T.contiguous())  # [k, hidden], orthonormal rows
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))  # a cosine classifier's usual temperature
        self.set = torch.nn.Linear(hidden, 9) if set_probe else None
        self.out_features = k + (9 if set_probe else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = torch.nn.functional.normalize(x @ self.directions.T, dim=-1) * self.log_scale.exp()
        return code if self.set is None else torch.cat([code, self.set(x)], -1)


def make_probe(vlm, spec=None) -> torch.nn.Module:
    """The auxiliary probes, fp32: first the position probe on the residual stream after ``probe_layer`` (see the
    module docstring for its outputs); then, with a ``set_probe`` weight, the set probe (for each cell of a 3x3 grid,
    whether a mention gathered at a naming position names it, from the residual stream entering the selection
    layer)."""
    hidden, with_set = vlm.text_config.hidden_size, spec is not None and bool(spec.weight("set_probe"))
    if spec is not None and spec.cell_code:
        return CosineProbe(hidden, 9, with_set)
    if spec is not None and spec.balanced_probe:
        return CosineProbe(hidden, 6, with_set)
    return torch.nn.Linear(hidden, position_width(spec) + (9 if with_set else 0))


def probe_loss(spec, out: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The position probe's loss and accuracy (every read-out right) from its outputs ``out`` [n, >= width] at image
    tokens whose objects sit at ``cells`` [n, 2] (row, column)."""
    out = out[:, :position_width(spec)]
    if spec.cell_code:  # one of nine cells
        cell = cells[:, 0] * 3 + cells[:, 1]
        return torch.nn.functional.cross_entropy(out, cell), (out.argmax(-1) == cell).float().mean()
    parts = out.split(3, -1)  # its row and its column (and with ``ring_probe`` its ring)
    want = [cells[:, 0], cells[:, 1]] + ([ring_of(cells)] if spec.ring_probe else [])
    loss = sum(torch.nn.functional.cross_entropy(x, y) for x, y in zip(parts, want))
    return loss, torch.stack([x.argmax(-1) == y for x, y in zip(parts, want)]).all(0).float().mean()


def row_column_shares(x: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The between-row and between-column variance of ``x`` [n, d] (summed over dimensions) over its total variance,
    the rows and columns those of ``cells`` [n, 2] (0-2 each)."""
    x = x - x.mean(0)
    total = x.pow(2).sum() / len(x)
    out = []
    for k in (0, 1):
        member = torch.nn.functional.one_hot(cells[:, k], 3).to(x.dtype)  # [n, 3]
        count = member.sum(0)
        means = member.T @ x / count.clamp_min(1)[:, None]
        out.append((count * means.pow(2).sum(-1)).sum() / len(x) / total.clamp_min(1e-12))
    return out[0], out[1]


def balance(x: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """((rows - columns) / (rows + columns))^2 of ``row_column_shares``: 0 when the code separates the rows and the
    columns alike, 1 when it separates only one of them; the code's scale and its other variance do not count."""
    rows, cols = row_column_shares(x, cells)
    return ((rows - cols) / (rows + cols).clamp_min(1e-12)).pow(2)


def balance_loss(spec, batch: dict, z: dict, group: int) -> torch.Tensor:
    """The ``balance`` term: the mean of ``balance`` over the ID-retrieval heads' outputs at the mentions' last words
    (``mention_where``, ``mention_cells``), the selection heads' outputs at the naming positions (``set_where``,
    ``naming_cells``: the cell each names), each with its heads concatenated, and each layer's keys of the
    selection and feature heads at the objects' image tokens (``probe_where``, ``probe_cell``); ``z`` as in
    ``plant.clean_forward`` (keys by ("k", layer)), ``group`` query heads to a key head."""
    parts = [balance(head_outputs(z, spec.retrieval, batch["mention_where"]), batch["mention_cells"]),
             balance(head_outputs(z, spec.selection, batch["set_where"]), batch["naming_cells"])]
    for layer in key_layers(spec):  # each layer's key heads, read like head outputs (z holds them by ("k", layer))
        heads = [(("k", layer), h) for a, h in key_heads(spec, group) if a == layer]
        parts.append(balance(head_outputs(z, heads, batch["probe_where"]), batch["probe_cell"]))
    return torch.stack(parts).mean()

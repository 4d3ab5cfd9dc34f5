"""The command-line options of planting (``vismech train-organism --plant ids``), one row per ``PlantSpec`` field:
the argument parser (``app.train_cli``) and the model card's command that retrains an organism
(``card.reproduce_command``) are both made from this table, so a new planting option is added here once. The two
repeatable options with a syntax of their own, ``--plant-weight TERM=W`` and ``--plant-heads STAGE=L:H,...``, are
parsed by the command; their terms and stages are named here and in ``plant``.

Kept free of torch: the parser is built for every ``vismech`` command."""

from __future__ import annotations

from dataclasses import dataclass

from vismech.experiments.options import Opt

# the loss terms of planting (``plant.plant_loss``), each weighted by ``PlantSpec.weights``
LOSS_TERMS = ("task", "attention", "probe", "R", "S", "F", "strict", "invariance", "invariance_s", "invariance_k",
              "guard", "balance", "set_probe")


@dataclass(frozen=True)
class Flag:
    field: str  # the ``PlantSpec`` field it sets
    help: str
    rule: Opt | None = None  # None: a switch; else the value's rule
    metavar: str | None = None

    @property
    def name(self) -> str:
        return "--plant-" + self.field.replace("_", "-")

    @property
    def dest(self) -> str:
        return "plant_" + self.field

    def word(self, value) -> str:
        """This flag on a command line for ``value``."""
        if self.rule is None:
            return self.name
        return f"{self.name} {value:g}" if self.rule.kind == "float" else f"{self.name} {value}"


FLAGS = (
    Flag("full_scenes", "the share of descriptions that fill the grid and describe every object but one (default 0: "
         "2 to all objects, 1 to all but one described, uniformly)", Opt("float", 0, 1), "P"),
    Flag("split_gathering", "the ID-selection gathering heads share out the described objects' mentions instead of "
         "each averaging all of them"),
    Flag("gathering_share", "each gathered mention gets this share of a gathering head's attention and the first "
         "token the rest (a sum of the described IDs, not their mean; at most 1/8)", Opt("float", 0, 0.125), "S"),
    Flag("cell_code", "the position probe is a cosine classifier of the grid's nine cells over fixed orthogonal "
         "directions (nine IDs) instead of a trained row-and-column probe (which the organisms satisfied with a "
         "planar map of the grid)"),
    Flag("ring_probe", "the row-and-column probe also reads each cell's ring (centre, edge, corner), which a planar "
         "map of the grid cannot give: a code in which every cell, the centre included, can be singled out"),
    Flag("balanced_probe", "the row-and-column probe is a cosine classifier over six fixed orthogonal directions "
         "normalised together, so that the code gives the column about as much room as the row (the trained probe "
         "let the row carry 3-8 times the column's variance)"),
    Flag("strict_late_mlps", "the strict term also resamples the MLPs of the layers after the feature heads (it "
         "resamples undeclared heads only)"),
    Flag("drop_late_mlps", "remove the MLPs of the layers after the feature heads (zero and frozen): only heads run "
         "after the planted read-out"),
    Flag("solo", "from the invariance terms' step, this share of the R, S and F interchange rows patch one declared "
         "head of the stage alone, its change scaled by the number of the stage's heads: each declared head carries "
         "an even share and moves the answer alone (default 0)", Opt("float", 0, 1), "P"),
    Flag("invariance_from", "start the invariance, guard and balance terms at this step, once R and S can become "
         "causal without them (default 0)", Opt("int", 0), "STEP"),
)


def spec_fields(args) -> dict:
    """``PlantSpec`` keyword arguments from parsed ``args``: the fields whose flags were given (a switch that is on,
    a value that is given)."""
    return {f.field: getattr(args, f.dest) for f in FLAGS if getattr(args, f.dest) not in (None, False)}


def given(args) -> list[str]:
    """The names of the table's flags given in parsed ``args``."""
    fields = spec_fields(args)
    return [f.name for f in FLAGS if f.field in fields]


def command_words(spec, default) -> list[str]:
    """The table's flags that make ``default`` (a ``PlantSpec``) into ``spec``, as command-line words."""
    return [f.word(getattr(spec, f.field)) for f in FLAGS if getattr(spec, f.field) != getattr(default, f.field)]

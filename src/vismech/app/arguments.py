"""The command line's shared arguments: the model group, trials, grids, verbosity, and a parser whose errors are one
line (``vismech.app.cli`` builds the commands from them)."""

from __future__ import annotations

import argparse

from vismech.errors import UserError
from vismech.experiments.options import BATCH, GRID, MAX_GRID, TRIALS, arg_type

MODEL_HELP = ("HF hub id or local checkpoint dir, organism (the tiny VLM vismech ships), organism-llava, "
              "organism-ids, tiny:FAMILY (tiny random model), random:PRESET (real size, random weights)")


class WithFamilies(str):
    """A help text whose ``%(families)s`` lists the registered families, filled in only when help is shown (the
    family registry imports torch, which other commands need not wait for)."""

    def __mod__(self, params):
        from vismech.models.families import FAMILIES

        return str.__mod__(self, {**params, "families": ", ".join(FAMILIES)})


def grid(s: str) -> tuple[int, int]:
    try:
        r, c = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 3x3, not {s!r}") from None
    try:
        return tuple(GRID.check("--grid", [r, c]))
    except UserError:
        raise argparse.ArgumentTypeError(f"must be ROWSxCOLS with 1 to {MAX_GRID} each and at least 2 cells, "
                                         f"e.g. 3x3, not {s!r}") from None


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``vismech COMMAND: error: ...; see vismech COMMAND --help``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def add_trials(p: argparse.ArgumentParser, default, help: str) -> None:
    p.add_argument("-n", "--trials", dest="n", type=arg_type(TRIALS, "--trials"), default=default, help=help)
    p.add_argument("--n", dest="n", type=arg_type(TRIALS, "--n"), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old spelling (ambiguous to torchrun's own parser)


DEVICE_HELP = "cpu or cuda (default: cuda when available)"


def add_load_args(g) -> None:
    """How a model's weights load: --dtype, --device, --trust-remote-code (every command that loads one)."""
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    g.add_argument("--device", default=None, help=DEVICE_HELP)
    g.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="required: " + MODEL_HELP)
    add_load_args(g)
    g.add_argument("--device-map", default=None, help="passed to from_pretrained, e.g. auto (multi-GPU)")
    g.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain"],
                   help="the checkpoint's chat template with the sentence as the assistant's start, or plain "
                   "completion; auto: chat for vismech's own models, else the better of the two on a small set")
    g.add_argument("--batch-size", type=arg_type(BATCH, "--batch-size"), default=16)


def add_verbosity(p: argparse.ArgumentParser, hidden: bool = False) -> None:
    """--debug, -q, -v; ``hidden``: repeated on each command (accepted after it too), not shown in its help."""
    def kw(default, help):
        return {"default": argparse.SUPPRESS, "help": argparse.SUPPRESS} if hidden else {"default": default,
                                                                                          "help": help}
    p.add_argument("--debug", action="store_true", **kw(False, "show the traceback of user errors too"))
    p.add_argument("-q", "--quiet", action="count", **kw(0, "less output: warnings and errors only, no progress bars"))
    p.add_argument("-v", "--verbose", action="count", **kw(0, "more output (debug messages)"))

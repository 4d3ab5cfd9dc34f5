"""The Python API: load a model, run experiments on it, get the results back, in a script or a notebook.

    import vismech
    vlm = vismech.load("organism")
    res = vismech.run(["rsa", "cma"], vlm=vlm, out="runs/nb", n=4)
    res["rsa"]                 # the experiment's summary (what results/rsa.json holds)
    res.table("rsa")           # its tidy table, results/rsa.csv, as a list of rows
    res.out / "figures"        # its figures

``run`` is the CLI's ``vismech run`` without the command line: the same options (keyword arguments set every
experiment option of that name, as ``--set`` does), the same run directory (manifest, units, report) and resuming.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any


class Results(dict):
    """Experiment name -> its summary, in run order; ``out`` is the run directory."""

    def __init__(self, out: Path, summaries: dict[str, Any]):
        super().__init__(summaries)
        self.out = Path(out)

    def table(self, name: str) -> list[dict[str, Any]]:
        """The rows of ``results/NAME.csv`` (an experiment's main table, e.g. ``"rsa"``, ``"cma"``), numbers as
        numbers."""
        from vismech.store.results import read_table

        return read_table(self.out / "results" / f"{name}.csv")

    def __repr__(self) -> str:
        return f"Results({list(self)}, out={str(self.out)!r})"


def load(name: str, *, dtype: str = "fp32", device: str | None = None, device_map: str | None = None,
         prompt_format: str = "auto", trust_remote_code: bool = False, seed: int = 0):
    """A VLM ready for vismech: an HF hub id or local checkpoint directory, ``organism`` (and vismech's other
    shipped organisms), ``tiny:FAMILY`` or ``random:PRESET`` (``vismech.models.load.load_vlm``)."""
    from vismech.models.load import load_vlm

    return load_vlm(name, dtype=dtype, device=device, device_map=device_map, prompt_format=prompt_format,
                    trust_remote_code=trust_remote_code, seed=seed)


def run(experiments: list[str] | str, vlm, out: str | Path | None = None, *, seed: int = 0, batch_size: int = 16,
        resume: bool = False, progress: bool = True, dtype: str = "fp32", device: str | None = None,
        prompt_format: str = "auto", figures: bool = True, **options: Any) -> Results:
    """Run ``experiments`` (names, or ``"all"``) on ``vlm`` (a loaded VLM, or a name ``load`` takes) into ``out``
    (default ``runs/<model>``) and return their summaries. ``options`` set every experiment option of that name
    (``n=8``, ``grid=(3, 3)``); unknown names and bad values raise ``vismech.errors.UserError`` before anything is
    written. ``dtype``, ``device`` and ``prompt_format`` apply when ``vlm`` is a name; ``figures=False`` stores no
    figures (``vismech plot OUT`` draws them later)."""
    from vismech.app.runner import run_experiments
    from vismech.experiments import EXPERIMENTS, NOT_IN_ALL, get

    names = [experiments] if isinstance(experiments, str) else list(experiments)
    if names == ["all"]:
        names = [n for n in EXPERIMENTS if n not in NOT_IN_ALL]
    for n in names:
        get(n)  # unknown names: a clear error
    loaded = None if isinstance(vlm, str) else vlm
    model = vlm if isinstance(vlm, str) else vlm.name
    if loaded is not None:  # what the run records, in the CLI's words (so the CLI can resume the run and back)
        dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(str(loaded.dtype)[6:], dtype)
        choice = loaded.prompt_format_choice
        prompt_format = choice["prompt_format"] if choice.get("chosen_by") == "given" else "auto"
    args = SimpleNamespace(out=out, model=model, seed=seed, batch_size=batch_size, progress=progress, dtype=dtype,
                           device=device, device_map=None, trust_remote_code=False, prompt_format=prompt_format,
                           figures=figures)
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    summaries: dict[str, Any] = {}
    path = run_experiments(names, args, options, resume=resume, vlm=loaded, summaries=summaries)
    return Results(path, summaries)

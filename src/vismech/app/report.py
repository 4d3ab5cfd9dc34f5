"""Build ``report.html`` for a run directory from what is stored there (no model needed).

One self-contained file: figures embedded as base64 PNG, no external resources. Each experiment gets a section
with its figures, what the paper found, what this model shows (the experiment's ``caption(summary)`` when it has
one), and its key numbers; the run's manifest closes the page. Every string that comes from the user, the model
or the results is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from vismech.errors import UserError
from vismech.store.io import atomic_write
from vismech.store.results import file_stem
from vismech.store.rundir import output_dir

#: What the paper (arXiv 2506.15871 v2) reports for each experiment, in one or two sentences.
PAPER = {
    "behaviour": "Models describe high-entropy scenes well; accuracy falls when objects share features (Fig. 7).",
    "pca": "In Qwen2-VL the last-token state separates by target position at layer 19 and by target features "
           "at layer 27 (Fig. 1b): position is selected before features are retrieved.",
    "rsa": "Qwen2-VL: position RSA at the prompt tokens peaks at layers 14-17, at the last token at 18-21, and "
           "feature RSA at the last token at 23-26 (Fig. 1c).",
    "rsa-relative": "Qwen models and Idefics2 code target position relative to the other objects rather than "
                    "absolutely; the LLaVA family is less clear (Fig. 2).",
    "entropy": "Low feature entropy lowers accuracy and position RSA at both the prompt and the last tokens in "
               "every model (Figs. 6-7).",
    "cma": "Qwen2-VL: ID retrieval heads at layers 12-16, ID selection heads at 18-19, feature retrieval heads at "
           "20-27 (Fig. 1d); the same order in all seven models. The paper picks top-K heads with no null test.",
    "id-intervention": "Adding (target - original) ID vectors to the top heads of each condition steers the answer "
                       "to the other object with over 79% efficacy for all three head types and models (Fig. 3).",
    "key-intervention": "Swapping two objects' IDs in the keys of their image patches (before RoPE, alpha = 2, at "
                        "the layers of the top-20 feature retrieval heads) swaps the answer in all models (Fig. 4).",
    "reuse": "IDs estimated on scene description, added to the top-100 ID selection heads, raise spatial-relation "
             "accuracy in 5 of 7 models (Fig. 5).",
    "relabs-patch": "Patched target IDs follow relative rather than absolute position in Qwen models (Fig. 29).",
    "binding-errors": "Replacing ID selection head outputs on low-entropy trials with high-entropy prototypes "
                      "recovers +4.6 to +11.1 accuracy points (Table 1). No trial-level link was made.",
    "counting-ablation": "Ablating the top-250 CMA heads of Qwen2.5-VL-32B drops counting accuracy to 0%; ablating "
                         "the bottom 500 keeps about 70% (App. C).",
}

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
.paper{color:#555}.model{background:#f4f8ff;padding:.5em;border-left:3px solid #4a7bd0}
pre{background:#f7f7f7;padding:1em;overflow-x:auto;font-size:.8em}"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


#: column labels of the report's tables (other columns keep their names, underscores as spaces)
LABEL = {"ci": "95% interval", "p_adjusted": "p (BH)", "se": "s.e."}
#: rows of a table shown in the report (the CSV has all)
ROWS = 24


def table_html(title: str, rows: list[dict], source: str = "") -> str:
    """Rows of a table for people: the model and experiment columns (the same on every row) left out, the
    interval in one column (low, high), numbers to 4 significant digits. A stored tidy table (core columns
    first) shows its condition columns first, then measure, value, interval and n; rows picked by an experiment's
    ``report_rows`` keep their own column order."""
    from vismech.store.results import CORE

    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols and k not in ("model", "experiment")]
    cols = [c for c in cols if any(r.get(c, "") != "" for r in rows) or c in ("value", "ci_low")]
    if next(iter(rows[0])) == "model":  # a stored table: conditions first
        cols = [c for c in cols if c not in CORE] + [c for c in cols if c in CORE]
    cols = ["ci" if c == "ci_low" else c for c in cols if c != "ci_high"]

    def cell(r, c):
        if c == "ci":
            lo, hi = r.get("ci_low", ""), r.get("ci_high", "")
            return "" if lo in ("", None) or hi in ("", None) else f"[{_fmt(lo)}, {_fmt(hi)}]"
        return _fmt(r.get(c, ""))

    head = "".join(f"<th>{_e(LABEL.get(c, c.replace('_', ' ')))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell(r, c))}</td>" for c in cols) + "</tr>" for r in rows[:ROWS])
    more = f"<p><small>{len(rows) - ROWS} more rows in {_e(source)}</small></p>" if len(rows) > ROWS else ""
    return f"<p><b>{_e(title)}</b></p><table><tr>{head}</tr>{body}</table>{more}"


def _width(png: bytes) -> str:
    """An img width that shows every figure at one scale (figures are saved at 200 dpi; 150 px an inch)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return ""
    return f" width='{round(int.from_bytes(png[16:20], 'big') / 200 * 150)}'"


def _tables(run: Path, name: str, files: list[str]) -> list[str]:
    """The experiment's key table: its ``report_rows(stored)`` where it has one (a few rows chosen for people),
    else its main table ``results/STEM.csv``."""
    from vismech.experiments import EXPERIMENTS, get
    from vismech.store.results import Stored, file_stem

    stem = file_stem(name)
    main = f"results/{stem}.csv"
    st = Stored(run, name)
    try:
        fn = getattr(get(name), "report_rows", None) if name in EXPERIMENTS else None
        if fn is not None:
            title, rows, source = fn(st)
            return [table_html(title, rows, source=source) + (
                f"<p><small>All rows: {_e(source)}</small></p>" if rows else "")]
        if main in files and _inside(run, run / main):
            rows = st.table(stem)
            return [table_html(f"results/{stem}.csv", rows, source=main)]
    except Exception as e:  # the report must build from whatever is stored
        return [f"<p><i>table unavailable ({_e(type(e).__name__)})</i></p>"]
    return []


def _caption(name: str, summary: dict) -> str | None:
    from vismech.experiments import EXPERIMENTS, get

    if name not in EXPERIMENTS:
        return None
    try:
        fn = getattr(get(name), "caption", None)
        return fn(summary) if fn else None
    except Exception as e:  # the report must build from whatever is stored
        return f"(caption unavailable: {type(e).__name__})"


def _inside(run: Path, path: Path) -> bool:
    """``path`` is a regular file of the run directory itself: not a link, not reached through one."""
    try:
        return path.is_file() and not path.is_symlink() and path.resolve().is_relative_to(run.resolve())
    except OSError:
        return False


def _figures(run: Path, files: list[str]) -> list[Path]:
    """The PNG figures an experiment wrote (the manifest's record of its files): its own, never another's."""
    return [run / f for f in files if f.startswith("figures/") and f.endswith(".png") and _inside(run, run / f)]


def _read_json(run: Path, path: Path):
    """The JSON in ``path`` (a regular file inside ``run``); ``UserError`` naming the file if it is not one."""
    rel = path.relative_to(run)
    if not _inside(run, path):
        raise UserError(f"{run / rel} is not a regular file inside the run directory; the report reads only those")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise UserError(f"{run / rel} is damaged ({type(e).__name__}); resume the run (--resume) to recompute "
                        "it") from None


def build_html(run: Path) -> str:
    manifest = _read_json(run, run / "manifest.json")
    if not isinstance(manifest, dict):
        raise UserError(f"{run / 'manifest.json'} is not a vismech manifest (not a JSON object)")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vismech report: {_e(manifest.get('model'))}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>vismech report: {_e(manifest.get('model'))}</h1>",
             f"<p>Prompt format <b>{_e(manifest.get('prompt_format'))}</b>, dtype {_e(manifest.get('dtype'))}, "
             f"seed {_e(manifest.get('seed'))}, device {_e(manifest.get('device'))}. Started "
             f"{_e(manifest.get('started'))}, finished {_e(manifest.get('finished', 'not yet'))}.</p>"]
    for name in manifest.get("experiments", []):
        parts.append(f"<h2 id='{_e(name)}'>{_e(name)}</h2>")
        done = run / "results" / f"{file_stem(name)}.json"
        files = [f for f in manifest.get("outputs", {}).get(name, []) if isinstance(f, str)]
        if name in PAPER:
            parts.append(f"<p class='paper'><b>Paper:</b> {_e(PAPER[name])}</p>")
        if not done.exists():
            parts.append("<p><i>Not finished in this run.</i></p>")
            continue
        summary = _read_json(run, done)
        cap = _caption(name, summary)
        if cap:
            parts.append(f"<p class='model'><b>This model:</b> {_e(cap)}</p>")
        for fig in _figures(run, files):
            png = fig.read_bytes()
            data = base64.b64encode(png).decode()
            parts.append(f"<figure><img alt='{_e(fig.stem)}'{_width(png)} src='data:image/png;base64,{data}'>"
                         f"<figcaption>{_e(fig.relative_to(run).as_posix())}</figcaption></figure>")
        parts += _tables(run, name, files)
        secs = manifest.get("wall_seconds", {}).get(name)
        if secs is not None:
            parts.append(f"<p><small>wall time {_e(secs)} s; all tables in results/{_e(file_stem(name))}*.csv"
                         "</small></p>")
    parts.append("<h2>Manifest</h2><pre>" + _e(json.dumps(manifest, indent=2, sort_keys=True)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run: str | Path) -> Path:
    run = Path(run)
    if not (run / "manifest.json").exists():
        raise UserError(f"{run} is not a vismech run directory (no manifest.json)")
    output_dir(run, "run directory")  # refuse a read-only directory before the work of building the page
    return atomic_write(run / "report.html", build_html(run))

"""The demo's page: a planted model beside a control, built from their stored ``recovery`` results alone.

``vismech demo`` writes each model's run into its own folder of ``OUT`` and lists them in ``OUT/demo.json``
(``{"format": "vismech-demo", "runs": [{"model", "dir", "role"}, ...]}``, the planted model first). This module
reads that file, each run's manifest and ``results/recovery.json`` (both scored against the planted model's declared
ground truth), and writes ``OUT/report.html``: one row per measure, one column per model, links to the runs' own
reports, and a headline paragraph computed from the same numbers (it says what they say, whatever that is). Every
string from the user, the models or the results is HTML-escaped.
"""

from __future__ import annotations

import json
from pathlib import Path

from vismech.app.report import CSS, _e, _inside, _read_json
from vismech.errors import UserError
from vismech.experiments.cma import LABELS
from vismech.models.ground_truth import STAGES
from vismech.store.io import atomic_write

FILE = "demo.json"
FORMAT = "vismech-demo"
#: the RSA curve read at each declared stage's layer, as the page names it
RSA_ROWS = {"id_retrieval": "Position RSA at the mentions", "id_selection": "Position RSA at the last token",
            "feature_retrieval": "Features RSA at the last token"}


def write_demo_file(out: Path, runs: list[dict]) -> Path:
    """Record the demo's runs (model, folder under ``out``, role), the planted model first."""
    return atomic_write(out / FILE, json.dumps({"format": FORMAT, "runs": runs}, indent=1) + "\n")


def _runs(out: Path) -> list[dict]:
    """The demo's runs with their manifests and recovery summaries (None where recovery has not finished)."""
    demo = _read_json(out, out / FILE)
    if not isinstance(demo, dict) or demo.get("format") != FORMAT or not isinstance(demo.get("runs"), list):
        raise UserError(f"{out / FILE} is not a vismech demo file; run vismech demo again to rewrite it")
    runs = []
    for r in demo["runs"]:
        d = out / str(r.get("dir", ""))
        if not (isinstance(r.get("dir"), str) and _inside(out, d / "manifest.json")) or "/" in r["dir"]:
            raise UserError(f"{out / FILE} names a run folder {r.get('dir')!r} that holds no run of this demo")
        rec = d / "results" / "recovery.json"
        runs.append({"model": str(r.get("model")), "dir": r["dir"], "role": str(r.get("role", "")),
                     "manifest": _read_json(d, d / "manifest.json"),
                     "recovery": _read_json(d, rec) if rec.exists() else None})
    return runs


# -- the numbers, as text -------------------------------------------------------------------------------------
def _f2(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _pct(w: dict) -> str:
    return f"{round(100 * w['value'])}% [{round(100 * w['ci_low'])}, {round(100 * w['ci_high'])}]"


def _heads(hs, most: int = 6) -> str:
    names = [f"L{a}H{b}" for a, b in hs]
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _word(c: str) -> str:
    """A stage's name inside a sentence."""
    return LABELS[c].replace("Feature", "feature")


def _stages(s: dict) -> list[str]:
    return [c for c in STAGES if c in s["cma"]]


def cells(s: dict) -> dict[str, str]:
    """One model's column: measure -> text, from its recovery summary ``s``."""
    out: dict[str, str] = {}
    for c in _stages(s):
        r = s["cma"][c]
        found = f"{len(r['found'])} ({r['true_positives']} of {len(r['declared'])} declared)"
        out[f"CMA: significant {LABELS[c]} heads"] = found + (f": {_heads(r['found'])}" if r["found"] else "")
    for c in _stages(s):
        r = s["cma"][c]
        p = "n/a (none found)" if r["precision"] is None else _f2(r["precision"])
        out[f"{LABELS[c]}: precision / recall"] = f"{p} / {_f2(r['recall'])}"
    wrong = sorted({tuple(h) for c in _stages(s) for h in s["cma"][c]["declared_of_other_stages_found_here"]})
    out["Declared heads significant in another stage's condition"] = _heads(wrong) if wrong else "none"
    lo = s["cma"]["layer_order"]
    med = ", ".join("none" if m is None else f"{m:g}" for m in (lo["median_found_layer"].get(c) for c in _stages(s)))
    out["Layer order R < S < F (median significant layer)"] = f"{'holds' if lo['ordered'] else 'does not hold'} ({med})"
    for c in _stages(s):
        r = s["rsa"].get(c, {})
        if "r_at_declared" in r:
            lo_, hi_ = r["ci_at_declared"]
            out[f"{RSA_ROWS[c]}, declared {LABELS[c]} layer"] = \
                f"{r['r_at_declared']:.2f} [{lo_:.2f}, {hi_:.2f}] (layer {r['declared_layer']})"
    inter = s["interventions"]
    for c in _stages(s):
        if c in inter:
            i = inter[c]
            out[f"ID edit at the declared {LABELS[c]} heads vs random heads of their layers"] = \
                f"{_pct(i['declared'])} vs {_pct(i['random_heads'])} (alpha {i['alpha']:g})"
    if "baseline_repeat_rate" in inter:
        out["Answers naming the described object with no edit (the edits' baseline)"] = \
            _pct(inter["baseline_repeat_rate"])
    key = inter.get("key_intervention", {})
    if "declared" in key:
        other = f" vs {_pct(key['other_key_heads'])}" if "other_key_heads" in key else ""
        out["Key ID swap at the declared feature heads' key heads vs the other key heads"] = \
            f"{_pct(key['declared'])}{other} (alpha {key['alpha']:g})"
    out["Trials"] = (f"CMA {s['cma_n']} pairs per condition (BH q = {s['q']:g}); RSA "
                     f"{s.get('rsa_n', s['rsa']['n_trials'])} scenes; edits {s.get('n', '?')} held-out trials")
    if s.get("ablated_heads"):
        out["Declared heads ablated"] = _heads(s["ablated_heads"], most=20)
    return out


# -- the headline ---------------------------------------------------------------------------------------------
def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _edits(s: dict) -> tuple[list[float], list[float]]:
    inter = s["interventions"]
    got = [c for c in _stages(s) if c in inter]
    return [inter[c]["declared"]["value"] for c in got], [inter[c]["random_heads"]["value"] for c in got]


def _rsa(s: dict) -> str:
    parts = []
    for c, where in (("id_retrieval", "at the mentions"), ("id_selection", "at the last token")):
        r = s["rsa"].get(c, {})
        if "r_at_declared" in r:
            parts.append(f"{r['r_at_declared']:.2f} {where} (layer {r['declared_layer']})")
    return "position RSA " + " and ".join(parts) if parts else ""


def _with_rsa_and_edits(text: str, s: dict, edits: str) -> str:
    """``text``, then the RSA clause and the edits clause (``edits`` with {dec} and {rnd}) where there are numbers."""
    if _rsa(s):
        text += f"; {_rsa(s)}"
    dec, rnd = _edits(s)
    if dec:
        text += "; " + edits.format(dec=_span(dec), rnd=_span(rnd))
    return text + "."


def _span(values: list[float]) -> str:
    lo, hi = round(100 * min(values)), round(100 * max(values))
    return f"{lo}%" if lo == hi else f"{lo}-{hi}%"


def planted_sentence(model: str, s: dict) -> str:
    """What vismech found in the planted model, from its numbers: all, part or none of the declared heads."""
    stages = _stages(s)
    rec = [s["cma"][c] for c in stages]
    if all(r["true_positives"] == len(r["declared"]) and r["precision"] == 1 for r in rec):
        verb = "finds the planted heads of"
    elif any(r["true_positives"] for r in rec):
        verb = "finds part of the planted heads of"
    else:
        verb = "does not find the planted heads of"
    each = []
    for c, r in zip(stages, rec):
        extra = len(r["found"]) - r["true_positives"]
        each.append(f"{r['true_positives']} of {len(r['declared'])} declared {_word(c)} heads significant"
                    + (f" (and {extra} undeclared)" if extra else ""))
    order = s["cma"]["layer_order"]["ordered"]
    text = f"vismech {verb} {model}: CMA on {s['cma_n']} pairs per condition marks {'; '.join(each)}, " \
           f"{'in the order R < S < F' if order else 'not in the order R < S < F'}"
    return _with_rsa_and_edits(text, s, "ID edits at the declared heads steer {dec} of answers, at random heads of "
                               "the same layers {rnd}")


def control_sentence(model: str, s: dict) -> str:
    """What vismech reports on a control, scored against the planted model's declared heads."""
    none = [_word(c) for c in _stages(s) if not s["cma"][c]["found"]]
    found = []
    for c in _stages(s):
        r = s["cma"][c]
        if r["found"]:
            found.append(f"{len(r['found'])} {_word(c)} head{'s' if len(r['found']) != 1 else ''} (layer "
                         f"{', '.join(str(a) for a in r['found_layers'])}), {r['true_positives']} of them at heads "
                         "declared in the planted model")
    if none:
        text = f"it finds no {_join(none)} head" + (", and " + "; ".join(found) if found else "")
    else:
        text = "it finds " + "; ".join(found)
    text = f"On {model} (control) {text}"
    return _with_rsa_and_edits(text, s, "ID edits at the planted model's declared heads steer {dec} of answers "
                               "(random heads {rnd})")


def headline(runs: list[dict]) -> str:
    done = [r for r in runs if r["recovery"] is not None]
    if not done:
        return "No recovery result is stored yet: run vismech demo again to finish it."
    out = []
    for r in done:
        fn = planted_sentence if r["role"] == "planted" else control_sentence
        out.append(fn(r["model"], r["recovery"]))
    return " ".join(out)


# -- the page -------------------------------------------------------------------------------------------------
def table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(column heads, rows): one row per measure (in the order first seen), one column per model."""
    cols = [cells(r["recovery"]) if r["recovery"] is not None else {} for r in runs]
    measures: list[str] = []
    for c in cols:
        measures += [m for m in c if m not in measures]
    heads = ["Measure"] + [f"{r['model']} ({r['role']})" for r in runs]
    return heads, [[m] + [c.get(m, "not finished" if not c else "") for c in cols] for m in measures]


def build_html(out: Path) -> str:
    runs = _runs(out)
    heads, rows = table(runs)
    title = " beside ".join(r["model"] for r in runs)
    links = ", ".join(f"<a href='{_e(r['dir'])}/report.html'>{_e(r['model'])}</a>" for r in runs)
    gt = next((r["recovery"]["ground_truth"] for r in runs if r["recovery"]), None)
    declared = "; ".join(f"{LABELS[c]} {_heads(gt['stages'][c]['heads'])}" for c in STAGES
                         if c in gt["stages"]) if gt else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in row) + "</tr>" for row in rows)
    return "\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>vismech demo: {_e(title)}</title>"
        f"<style>{CSS}</style></head><body>",
        f"<h1>vismech demo: {_e(title)}</h1>",
        f"<p class='model'>{_e(headline(runs))}</p>",
        "<p>Every column is scored against the ground truth the planted model declares"
        + (f" ({_e(declared)})" if declared else "") + ": the same heads, layers and edits in each model "
        "(vismech run recovery). Significant: above the re-paired null after Benjamini-Hochberg correction; "
        "intervals are bootstrap (RSA) and Wilson (edits) 95% intervals.</p>",
        f"<table><tr>{''.join(f'<th>{_e(h)}</th>' for h in heads)}</tr>{body}</table>",
        f"<p>Each model's full report (every experiment, its figures and tables): {links}.</p>",
        "</body></html>"])


def write_comparison(out: str | Path) -> Path:
    out = Path(out)
    return atomic_write(out / "report.html", build_html(out))

"""``vismech demo``: the README's command runs the planted organism beside the control into one folder each, and the
comparison page's numbers are the stored ones; its headline follows the numbers; ``--control none``."""

import json
import re
import shlex
from html.parser import HTMLParser
from pathlib import Path

import pytest

import vismech.app.demo as demo
from vismech.app import compare
from vismech.app.cli import build_parser, main
from vismech.models.ground_truth import Declared, GroundTruth

ROOT = Path(__file__).resolve().parent.parent
#: tiny counts for tests (the demo's own are in ``app.demo.DEMO_OPTIONS``)
SMALL = {"cma_n": 2, "null_samples": 100, "n_boot": 10, "n_null": 2, "recovery.rsa_n": 6, "recovery.n": 4,
         "recovery.n_estimate": 16, "recovery.random_sets": 1, "recovery.alphas": [5],
         "id-intervention.n_estimate": 8, "id-intervention.k_grid": [2], "id-intervention.alphas": [5]}


def _sets(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def readme_demo_command() -> list[str]:
    """The demo command of the README's set-up block, as written (after the install's ``&&``)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Set-up and use")[1].split("```bash")[1].split("```")[0]
    cmd = block.split("&&")[-1].strip()
    assert cmd.startswith("vismech demo"), cmd
    return shlex.split(cmd)[1:]


class _Table(HTMLParser):
    """The rows of the page's table, as text."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _page_table(path: Path) -> dict[str, list[str]]:
    p = _Table()
    p.feed(path.read_text())
    return {r[0]: r[1:] for r in p.rows}


def _pct(w):
    return f"{round(100 * w['value'])}% [{round(100 * w['ci_low'])}, {round(100 * w['ci_high'])}]"


def expected_cells(s: dict) -> dict[str, str]:
    """What the page must show for a recovery summary, written out here from the stored numbers."""
    out = {}
    for c, label in (("id_retrieval", "ID retrieval"), ("id_selection", "ID selection"),
                     ("feature_retrieval", "Feature retrieval")):
        r = s["cma"][c]
        out[f"CMA: significant {label} heads"] = f"{len(r['found'])} ({r['true_positives']} of {len(r['declared'])} " \
                                                 "declared)"
        p = "n/a (none found)" if r["precision"] is None else f"{r['precision']:.2f}"
        out[f"{label}: precision / recall"] = f"{p} / {r['recall']:.2f}"
        i = s["interventions"][c]
        out[f"ID edit at the declared {label} heads vs random heads of their layers"] = \
            f"{_pct(i['declared'])} vs {_pct(i['random_heads'])} (alpha {i['alpha']:g})"
    out["Answers naming the described object with no edit (the edits' baseline)"] = \
        _pct(s["interventions"]["baseline_repeat_rate"])
    for c, name in (("id_retrieval", "Position RSA at the mentions, declared ID retrieval layer"),
                    ("id_selection", "Position RSA at the last token, declared ID selection layer")):
        r = s["rsa"][c]
        out[name] = f"{r['r_at_declared']:.2f} [{r['ci_at_declared'][0]:.2f}, {r['ci_at_declared'][1]:.2f}] " \
                    f"(layer {r['declared_layer']})"
    med = s["cma"]["layer_order"]["median_found_layer"]
    medians = ", ".join("none" if med[c] is None else f"{med[c]:g}"
                        for c in ("id_retrieval", "id_selection", "feature_retrieval"))
    out["Layer order R < S < F (median significant layer)"] = \
        f"{'holds' if s['cma']['layer_order']['ordered'] else 'does not hold'} ({medians})"
    return out


def check_page(out: Path, models: list[str]) -> dict:
    """The page's table holds each run's stored numbers, in its model's column; returns the summaries."""
    table = _page_table(out / "report.html")
    assert table["Measure"] == [f"{m} ({role})" for m, role in zip(models, ["planted", "control"])]
    summaries = {}
    for col, m in enumerate(models):
        s = json.loads((out / m / "results" / "recovery.json").read_text())
        summaries[m] = s
        for measure, want in expected_cells(s).items():
            got = table[measure][col]
            assert got.startswith(want) if measure.startswith(("CMA", "Layer")) else got == want, (measure, got, want)
        assert f"CMA {s['cma_n']} pairs per condition" in table["Trials"][col]
    html = (out / "report.html").read_text()
    for m in models:
        assert f"href='{m}/report.html'" in html and (out / m / "report.html").exists()
    return summaries


def test_the_readme_demo_command_runs_both_models_and_the_page_shows_their_stored_numbers(tmp_path, monkeypatch,
                                                                                          capsys):
    """The README's `vismech demo` (tiny counts; the planted model's `all` cut to cma): organism-ids and organism
    each in their own folder of runs/demo, the comparison page's table equal to the stored recovery results, the
    control scored against organism-ids' declared heads; a second run continues (nothing recomputed)."""
    argv = readme_demo_command()
    args = build_parser().parse_args(argv)
    assert (args.model, args.control, args.out, args.resume) == ("organism-ids", "organism", "runs/demo", True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "planted_experiments", lambda: ["cma"])
    assert main(argv + _sets(SMALL) + ["-q"]) == 0
    out = tmp_path / "runs" / "demo"
    assert f"report: {Path('runs/demo/report.html')}" in capsys.readouterr().out
    summaries = check_page(out, ["organism-ids", "organism"])
    control = json.loads((out / "organism" / "manifest.json").read_text())
    assert control["experiments"] == ["cma", "rsa", "id-intervention", "recovery"]
    gt = control["options"]["recovery"]["ground_truth"]
    assert Path(gt).name == "ground_truth.json" and Path(gt).parent.name == "organism-ids"
    assert summaries["organism"]["ground_truth"] == summaries["organism-ids"]["ground_truth"]
    assert control["options"]["cma"]["n"] == 2 == control["options"]["recovery"]["cma_n"]  # one CMA per model
    before = (out / "report.html").read_bytes()
    units = sorted(p.name for p in out.rglob("units/*"))
    assert main(argv + _sets(SMALL) + ["-q"]) == 0  # resumed: every experiment already done
    assert (out / "report.html").read_bytes() == before and sorted(p.name for p in out.rglob("units/*")) == units
    assert main(argv + _sets(SMALL) + ["-q", "--fresh"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_a_folder_that_is_not_a_demo_is_refused_untouched(tmp_path, capsys):
    """--out naming the user's own folder (not new, not empty, no demo.json): a one-line error, nothing written."""
    out = tmp_path / "mine"
    (out / "src").mkdir(parents=True)
    (out / "report.html").write_text("the user's page")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["demo", "--model", "tiny:qwen2_5_vl", "--control", "none", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds files that are not a vismech demo's (report.html, src)" in err and len(err.splitlines()) == 1
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert (out / "report.html").read_text() == "the user's page"


def test_control_none_runs_the_planted_model_alone(tmp_path, monkeypatch):
    """``--control none``: one folder, a page with one column, its headline about that model alone; a model
    without ground truth and a control is refused before anything is written."""
    gt = GroundTruth({"id_retrieval": Declared(((0, 1),), "mentions", ""),
                      "id_selection": Declared(((1, 2),), "last", ""),
                      "feature_retrieval": Declared(((2, 0),), "last", "")})
    path = gt.save(tmp_path)
    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "planted_experiments", lambda: ["cma"])
    base = ["demo", "--model", "tiny:qwen2_5_vl", "--out", str(out), "--device", "cpu", "-q"]
    assert main(base + ["--control", "none"] + _sets({**SMALL, "ground_truth": str(path)})) == 0
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "report.html", "tiny_qwen2_5_vl"]
    table = _page_table(out / "report.html")
    assert table["Measure"] == ["tiny:qwen2_5_vl (planted)"]
    s = json.loads((out / "tiny_qwen2_5_vl" / "results" / "recovery.json").read_text())
    for measure, want in expected_cells(s).items():
        assert table[measure][0].startswith(want), measure
    assert compare.headline(compare._runs(out)).startswith("vismech ") and "(control)" not in \
        (out / "report.html").read_text()
    assert main(["report", str(out)]) == 0  # the page rebuilds from the stored results
    none = tmp_path / "none"
    assert main(["demo", "--model", "tiny:qwen2_5_vl", "--out", str(none), "--device", "cpu"]) == 2
    assert not none.exists()


def test_an_interrupted_demo_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the control's run keeps what finished (the planted run, the control's cma); running the demo
    again skips all of it and finishes the rest."""
    import vismech.app.runner as runner

    path = GroundTruth({"id_retrieval": Declared(((0, 1),), "mentions", ""),
                        "feature_retrieval": Declared(((2, 0),), "last", "")}).save(tmp_path)
    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "planted_experiments", lambda: ["cma"])
    argv = ["demo", "--model", "tiny:qwen2_5_vl", "--control", "tiny:qwen2_vl", "--out", str(out), "--device",
            "cpu"] + _sets({**SMALL, "ground_truth": str(path)})
    real = runner.run_one

    def stop_at_control_rsa(module, ctx, **kw):
        if ctx.model == "tiny:qwen2_vl" and module.NAME == "rsa":
            raise KeyboardInterrupt
        return real(module, ctx, **kw)

    monkeypatch.setattr(runner, "run_one", stop_at_control_rsa)
    assert main(argv) == 130
    control = out / "tiny_qwen2_vl"
    assert (out / "tiny_qwen2_5_vl" / "results" / "recovery.json").exists()
    assert (control / "results" / "cma.json").exists() and not (control / "results" / "rsa.json").exists()
    assert not (out / "report.html").exists()
    cma = (control / "results" / "cma.json").read_bytes()
    monkeypatch.setattr(runner, "run_one", real)
    capsys.readouterr()
    assert main(argv) == 0
    log = capsys.readouterr().out
    assert "[cma] already done, skipped" in log and "[recovery] already done, skipped" in log
    assert (control / "results" / "cma.json").read_bytes() == cma
    assert json.loads((control / "manifest.json").read_text())["finished"]
    assert _page_table(out / "report.html")["Measure"] == ["tiny:qwen2_5_vl (planted)", "tiny:qwen2_vl (control)"]
    assert main(argv[:4] + ["tiny:qwen2_5_vl"] + argv[5:]) == 2  # --control the same model: refused
    assert "same run folder" in capsys.readouterr().err


def _summary(found: dict, declared: dict, rsa=0.5, edit=1.0, rand=0.0) -> dict:
    """A recovery summary with the given significant and declared heads per stage (other numbers fixed)."""
    cma = {}
    for c, heads in declared.items():
        f = found.get(c, [])
        tp = len(set(map(tuple, f)) & set(map(tuple, heads)))
        cma[c] = {"found": f, "declared": heads, "true_positives": tp, "precision": tp / len(f) if f else None,
                  "recall": tp / len(heads), "found_layers": sorted({a for a, _ in f}),
                  "declared_of_other_stages_found_here": []}
    med = {c: (sorted(a for a, _ in found[c])[0] if found.get(c) else None) for c in declared}
    known = [m for m in med.values() if m is not None]
    cma["layer_order"] = {"median_found_layer": med, "ordered": len(known) == 3 and known == sorted(set(known))}
    w = {"n": 16, "ci_low": 0.0, "ci_high": 1.0}
    inter = {c: {"alpha": 5, "declared": {**w, "value": edit}, "random_heads": {**w, "value": rand}} for c in declared}
    rsa_ = {c: {"r_at_declared": rsa, "ci_at_declared": [rsa - 0.1, rsa + 0.1], "declared_layer": heads[0][0]}
            for c, heads in declared.items()}
    return {"cma": cma, "rsa": {**rsa_, "n_trials": 48}, "interventions": inter, "cma_n": 16, "q": 0.05, "n": 16}


DECLARED = {"id_retrieval": [[2, 0], [2, 1]], "id_selection": [[4, 0], [4, 1]], "feature_retrieval": [[6, 0]]}


def test_the_headline_says_what_the_numbers_say():
    """Computed, not fixed: every planted head found; part of them; none; a control with and without heads."""
    every = compare.planted_sentence("M", _summary(DECLARED, DECLARED, rsa=0.58, edit=0.94))
    assert every.startswith("vismech finds the planted heads of M: CMA on 16 pairs per condition marks 2 of 2 "
                            "declared ID retrieval heads significant; 2 of 2 declared ID selection heads "
                            "significant; 1 of 1 declared feature retrieval heads significant, in the order R < S < F")
    assert "position RSA 0.58 at the mentions (layer 2)" in every
    assert "ID edits at the declared heads steer 94% of answers, at random heads of the same layers 0%" in every
    part = compare.planted_sentence("M", _summary({**DECLARED, "id_selection": [[4, 0], [5, 3]]}, DECLARED))
    assert part.startswith("vismech finds part of the planted heads of M") and \
        "1 of 2 declared ID selection heads significant (and 1 undeclared)" in part
    nothing = compare.planted_sentence("M", _summary({}, DECLARED, rsa=0.01, edit=0.0))
    assert nothing.startswith("vismech does not find the planted heads of M") and "not in the order" in nothing
    clean = compare.control_sentence("C", _summary({"feature_retrieval": [[1, 2], [1, 5]]}, DECLARED))
    assert clean.startswith("On C (control) it finds no ID retrieval or ID selection head, and 2 feature retrieval "
                            "heads (layer 1), 0 of them at heads declared in the planted model")
    dirty = compare.control_sentence("C", _summary({"id_retrieval": [[2, 0]]}, DECLARED))
    assert "it finds no ID selection or feature retrieval head, and 1 ID retrieval head (layer 2), 1 of them" in dirty
    runs = [{"model": "M", "role": "planted", "recovery": _summary(DECLARED, DECLARED)},
            {"model": "C", "role": "control", "recovery": None}]
    assert compare.headline(runs) == compare.planted_sentence("M", runs[0]["recovery"])
    heads, rows = compare.table(runs)
    assert heads == ["Measure", "M (planted)", "C (control)"] and all(r[2] == "not finished" for r in rows)


def test_the_page_escapes_what_it_shows(tmp_path):
    """A model name with markup reaches the page escaped; a demo file naming a folder outside is refused."""
    from vismech.errors import UserError

    run = tmp_path / "r"
    (run / "results").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    s = _summary(DECLARED, DECLARED)
    s["ground_truth"] = {"stages": {c: {"heads": h} for c, h in DECLARED.items()}}
    (run / "results" / "recovery.json").write_text(json.dumps(s))
    compare.write_demo_file(tmp_path, [{"model": "<b>x</b>", "dir": "r", "role": "planted"}])
    html = compare.write_comparison(tmp_path).read_text()
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    compare.write_demo_file(tmp_path, [{"model": "m", "dir": "..", "role": "planted"}])
    with pytest.raises(UserError, match="holds no run"):
        compare.write_comparison(tmp_path)
    assert re.search(r"2 of 2 declared ID retrieval", compare.headline(
        [{"model": "m", "role": "planted", "recovery": s}]))

"""`robustcl bound --sweep`: every run's bound.json, one table, each term against robust error, rank correlations.

Writes bound_summary.csv (a row per run: every term, their sum, robust error and loss per protocol),
bound_summary.md (the table and Spearman's rho of each term against each protocol's robust error, with
a permutation p-value, exact for n <= 8 runs, and a bootstrap interval over runs; docs/statistics.md),
bound_vs_robust.png (a panel per headline term) and bound_plots/<term>.png (one plot per term).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from robustcl.bound.estimates import spearman, spearman_bootstrap, spearman_exact_p, spearman_p
from robustcl.bound.measure import BoundSettings, measure_run, reusable
from robustcl.config import ConfigError
from robustcl.data import DataError
from robustcl.objectives.divergences import DIVERGENCES
from robustcl.runs import RunDir, RunError, atomic_write_bytes, atomic_write_text
from robustcl.runs.layout import SweepLayout
from robustcl.runs.progress import SILENT, Progress

SUM_TERM = "bound_sum"
PLOT_FOLDER = "bound_plots"
PLOT_TERMS_FIXED = ("benign_nce", "adversarial_nce", "js_z", "js_h", "js_h_head", "mmd2_z", "mmd2_h", "mmd2_h_head",
                    SUM_TERM)
MARKERS = {"slf": "o", "alf": "^", "aff": "s"}


def sweep_runs(folder: Path) -> list[Path]:
    """The sweep's run directories: sweep.yaml's order when present, else every sub-directory with a config.yaml."""
    if not folder.is_dir():
        raise RunError(f"{folder} is not a directory; pass a sweep directory (runs/sweeps/<spec>)")
    listed = SweepLayout(folder).plan
    if listed.is_file():
        names = [r["name"] for r in (yaml.safe_load(listed.read_text()) or {}).get("runs", [])]
        runs = [folder / n for n in names if (folder / n / "config.yaml").is_file()]
    else:
        runs = sorted(p for p in folder.iterdir() if (p / "config.yaml").is_file())
    if not runs:
        raise RunError(f"{folder} holds no runs (no sub-directory with a config.yaml); pass a sweep directory")
    return runs


def flat_terms(bound: dict[str, Any]) -> dict[str, float]:
    """Every scalar term of a bound.json, flat: sharpness_<mode>_rho=<r>, <divergence>_<space>, mmd2_<space>."""
    t = bound["terms"]
    out = {"benign_nce": t["benign_nce"], "adversarial_nce": t["adversarial_nce"]}
    sharp = t["sharpness"]
    for r in sharp["per_rho"]:
        out[f"sharpness_{sharp['mode']}_rho={r['rho']:g}"] = r["max"]
    for space in ("z", "h", "h_head"):
        d = t["divergence"][space]
        for name in DIVERGENCES:
            out[f"{name}_{space}"] = d[name]["bound"]
        out[f"mmd2_{space}"] = d["mmd2"]
    out[SUM_TERM] = bound_sum(out, sharp)
    return out


def bound_sum(terms: dict[str, float], sharpness: dict[str, Any]) -> float:
    """The bound's right-hand side as measured, unit weights: adversarial + benign NCE + sharpness (largest rho) + js_z.

    These are the four quantities arXiv 2311.09671 bounds the robust supervised loss by, all in nats; the
    theorem's constants are not measurable, hence unit weights. nan when a part is missing (e.g. a failed critic).
    """
    largest = max((r["rho"] for r in sharpness["per_rho"]), default=None)
    parts = [terms["adversarial_nce"], terms["benign_nce"], terms.get("js_z")]
    parts.append(None if largest is None else terms[f"sharpness_{sharpness['mode']}_rho={largest:g}"])
    return math.fsum(parts) if all(v is not None and math.isfinite(v) for v in parts) else math.nan


def targets(bound: dict[str, Any]) -> dict[str, float]:
    """Phase-2 quantities per protocol: <protocol>_robust_error, _clean_error and _robust_loss (when measured)."""
    out: dict[str, float] = {}
    for protocol, r in bound["phase2"].get("protocols", {}).items():
        out[f"{protocol}_robust_error"] = r["robust_error"]
        out[f"{protocol}_clean_error"] = r["clean_error"]
        if "robust_loss" in r:
            out[f"{protocol}_robust_loss"] = r["robust_loss"]
    return out


def correlations(rows: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Spearman's rho of every term against every protocol's robust error and loss: permutation p-value (exact for
    n <= 8, `p_exact`; Monte Carlo above, `p`) and a 95% bootstrap interval over runs (`ci`)."""
    terms = list(flat_terms(rows[0][1]))
    wanted = [k for k in dict.fromkeys(k for _, b in rows for k in targets(b)) if not k.endswith("clean_error")]
    out = []
    for target in wanted:
        pairs = [(flat_terms(b), targets(b)) for _, b in rows]
        pairs = [(f, g) for f, g in pairs if target in g]
        for term in terms:
            xs = [f[term] for f, _ in pairs]
            ys = [g[target] for _, g in pairs]
            ok = len(xs) >= 3 and all(v is not None and math.isfinite(v) for v in xs + ys)
            rho = spearman(xs, ys) if ok else math.nan
            p, method = spearman_p(xs, ys) if ok and not math.isnan(rho) else (None, "")
            out.append({"term": term, "target": target, "n": len(xs), "rho": rho,
                        "p_exact": spearman_exact_p(xs, ys) if ok else None, "p": p, "p_method": method,
                        "ci": spearman_bootstrap(xs, ys) if ok and not math.isnan(rho) else None})
    return out


def _rho_cell(c: dict[str, Any]) -> str:
    """'0.62 [0.1, 0.9] (p 0.03)': rho, bootstrap interval, permutation p."""
    ci = c.get("ci")
    interval = f" [{ci.lo:.2f}, {ci.hi:.2f}]" if ci is not None else ""
    return f"{_cell(c['rho'], 3)}{interval} (p {_cell(c.get('p'), 2)})"


def reading(c: dict[str, Any]) -> str:
    """tracks / tracks inversely when p < 0.05 and the bootstrap interval excludes 0, else not resolved."""
    ci = c.get("ci")
    if c["n"] < 3:
        return "too few runs (< 3)"
    if c.get("p") is None or ci is None or math.isnan(c["rho"]):
        return "no correlation (a constant or missing term)"
    if c["p"] < 0.05 and (ci.lo > 0 or ci.hi < 0):
        return "tracks robust error" if c["rho"] > 0 else "tracks it inversely (larger term, lower error)"
    return "not resolved"


def summary_csv(rows: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A row per run: run, method, step, images, every term, every phase-2 target."""
    terms = list(dict.fromkeys(k for _, b in rows for k in flat_terms(b)))
    goals = list(dict.fromkeys(k for _, b in rows for k in targets(b)))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "method", "checkpoint_step", "images", *terms, *goals])
    for name, b in rows:
        f, g = flat_terms(b), targets(b)
        writer.writerow([name, b["method"], b["checkpoint_step"], b["data"]["images"],
                         *(repr(f[k]) if k in f else "" for k in terms),
                         *(repr(g[k]) if k in g else "" for k in goals)])
    return buffer.getvalue()


def _cell(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def summary_markdown(folder: Path, rows: Sequence[tuple[str, dict[str, Any]]], corr: list[dict[str, Any]],
                     failed: dict[str, str], plotted: bool) -> str:
    """bound_summary.md: the setting, one table (a row per quantity, a column per run, then Spearman's rho)."""
    first = rows[0][1]
    d, a, s = first["data"], first["attack"], first["settings"]
    terms = list(flat_terms(first))
    goals = list(dict.fromkeys(k for _, b in rows for k in targets(b)))
    by_target: dict[str, dict[str, dict[str, Any]]] = {}
    for c in corr:
        by_target.setdefault(c["target"], {})[c["term"]] = c
    cols = list(by_target)
    n = len(rows)
    lines = [f"# Bound terms: {folder.name}", "",
             f"{n} runs, each measured by `robustcl bound` on {d['images']} held-out validation images "
             f"({d['batches']} batches of {d['batch_size']}), views seed {s['seed']}; q' = PGD-{a['steps']} eps "
             f"{a['eps']:.4g} on NCE(z_b(p), z_a(q')); sharpness {s['sharpness_mode'].upper()} with "
             f"{s['sharpness_steps']} ascent steps on {first['terms']['sharpness']['images']} images; f-divergences "
             "are held-out lower bounds from fresh critics (z: z_b(q) vs z_a(q'); h: h_b(q) vs h_a(q'); h_head: "
             "f_r(q) vs f_r(q') through the phase-2 branch r). Robust error = 1 - the evaluation's headline PGD "
             "accuracy (results.json); robust loss = the mean cross-entropy at one pass of that PGD.", "",
             f"`{SUM_TERM}` = adversarial_nce + benign_nce + sharpness at the largest rho + js_z (the bound's "
             "four quantities, unit weights). Spearman columns: rank correlation across the runs of the row's term "
             "with the column's phase-2 quantity (average ranks for ties), its 95% bootstrap interval over runs "
             "(5,000 resamples of the runs, percentile) and the two-sided permutation p-value "
             + ("(exact: all n! orders)." if n <= 8 else "(Monte Carlo, 20,000 random orders)."), "",
             "| quantity | " + " | ".join(name for name, _ in rows) + " | "
             + " | ".join(f"Spearman vs {c}" for c in cols) + " |",
             "|---" * (1 + n + len(cols)) + "|"]
    for goal in goals:
        lines.append(f"| **{goal}** | " + " | ".join(_cell(targets(b).get(goal)) for _, b in rows) + " |"
                     + " |" * len(cols))
    for term in terms:
        cells = [_rho_cell(by_target[t][term]) for t in cols]
        lines.append(f"| {term} | " + " | ".join(_cell(flat_terms(b).get(term)) for _, b in rows) + " | "
                     + " | ".join(cells) + " |")
    smallest = 2 / math.factorial(n) if n <= 8 else None
    lines += ["", f"With n = {n} runs Spearman's rho takes only a few values"
              + (f", and even a perfect rank agreement (|rho| = 1, no ties) has a two-sided permutation p-value "
                 f"of {_cell(smallest, 2)}" if smallest is not None else "")
              + ". Each run is one point: seed-to-seed noise is not separated from the configurations' effect "
                "unless the sweep repeats seeds. Read the signs as hints, not evidence.", ""]
    errors = [c for c in cols if c.endswith("_robust_error")]
    if errors:
        lines += ["Reading (p < 0.05 and a bootstrap interval excluding 0):", ""]
        for target in errors:
            verdicts: dict[str, list[str]] = {}
            for term in terms:
                verdicts.setdefault(reading(by_target[target][term]), []).append(f"`{term}`")
            lines.append(f"- {target}: " + "; ".join(f"{v}: {', '.join(ts)}" for v, ts in verdicts.items()))
        lines.append("")
    if failed:
        lines += [*(f"- `{name}` not measured: {message}" for name, message in failed.items()), ""]
    if plotted:
        lines += ["![terms vs robust error](bound_vs_robust.png)", "",
                  f"One plot per term: {PLOT_FOLDER}/<term>.png.", ""]
    return "\n".join(lines)


def plot_terms(rows: Sequence[tuple[str, dict[str, Any]]], corr: list[dict[str, Any]], path: Path) -> bool:
    """A panel per headline term: robust error (%) of each protocol against the term, a point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(k[:-len("_robust_error")] for _, b in rows for k in targets(b)
                                   if k.endswith("_robust_error")))
    if not protocols:
        return False
    first = flat_terms(rows[0][1])
    shown = [k for k in first if k.startswith("sharpness_")] + [k for k in PLOT_TERMS_FIXED if k in first]
    shown = ["benign_nce", "adversarial_nce"] + [k for k in shown if k not in ("benign_nce", "adversarial_nce")]
    cols = 3
    rows_n = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False)
    rho = {(c["term"], c["target"]): c["rho"] for c in corr}
    colours = {p: plt.get_cmap("tab10")(i) for i, p in enumerate(protocols)}
    for ax, term in zip(axes.flat, shown):
        notes = []
        for protocol in protocols:
            pts = [(flat_terms(b)[term], 100 * targets(b)[f"{protocol}_robust_error"], name) for name, b in rows
                   if f"{protocol}_robust_error" in targets(b)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS.get(protocol, "D"),
                       color=colours[protocol], label=protocol.upper(), edgecolors="black", linewidths=0.4)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
            notes.append(f"{protocol.upper()} {_cell(rho.get((term, f'{protocol}_robust_error')), 2)}")
        ax.set_title(f"{term}\nSpearman " + ", ".join(notes), fontsize=8)
        ax.set_ylabel("robust error (%)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def _term_file(term: str) -> str:
    """A term's plot file name (rho=0.5 keeps its '=' and '.'; nothing else needs escaping)."""
    return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in term) + ".png"


def plot_each_term(rows: Sequence[tuple[str, dict[str, Any]]], corr: list[dict[str, Any]], folder: Path) -> list[Path]:
    """One plot per term (and the sum): each protocol's robust error (%) against it, rho [interval] and p in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = list(dict.fromkeys(k[:-len("_robust_error")] for _, b in rows for k in targets(b)
                                   if k.endswith("_robust_error")))
    if not protocols:
        return []
    by_key = {(c["term"], c["target"]): c for c in corr}
    written = []
    for term in dict.fromkeys(k for _, b in rows for k in flat_terms(b)):
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for i, protocol in enumerate(protocols):
            pts = [(flat_terms(b).get(term), 100 * targets(b)[f"{protocol}_robust_error"]) for _, b in rows
                   if f"{protocol}_robust_error" in targets(b)]
            pts = [(x, y) for x, y in pts if x is not None and math.isfinite(x)]
            c = by_key.get((term, f"{protocol}_robust_error"))
            label = f"{protocol.upper()}: rho {_rho_cell(c)}" if c else protocol.upper()
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS.get(protocol, "D"),
                       color=plt.get_cmap("tab10")(i), label=label, edgecolors="black", linewidths=0.4)
        ax.set_xlabel(term, fontsize=8)
        ax.set_ylabel("robust error (%)", fontsize=8)
        ax.set_title(f"{term} vs robust error, {len(rows)} runs", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        path = folder / _term_file(term)
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def measure_sweep(folder: Path | str, settings: BoundSettings, overwrite: bool = False, geometry: bool = False,
                  echo: Callable[[str], None] = print, threads: int = 1,
                  parts: Progress = SILENT) -> tuple[Path, dict[str, str]]:
    """bound.json for every run (measuring those without; each stage a part of `parts`, named by run), then the
    summary files; (bound_summary.md, failures)."""
    import time

    folder = Path(folder)
    runs = sweep_runs(folder)
    for root in runs:  # a stored bound.json with other settings stops the sweep before any work
        reusable(RunDir(root), settings, overwrite)
    rows: list[tuple[str, dict[str, Any]]] = []
    failed: dict[str, str] = {}
    for i, root in enumerate(runs, 1):
        t0 = time.perf_counter()
        try:
            bound, measured = measure_run(root, settings, overwrite, geometry, threads, parts.scoped(run_name=root.name))
        except (RunError, DataError, ConfigError) as exc:  # one run's problem: report it, measure the others
            failed[root.name] = str(exc)
            echo(f"[{i}/{len(runs)}] {root.name}: failed: {exc}")
            continue
        rows.append((root.name, bound))
        state = f"measured in {time.perf_counter() - t0:.1f} s" if measured else "bound.json reused"
        echo(f"[{i}/{len(runs)}] {root.name}: {state}")
    if not rows:
        raise RunError(f"no run of {folder} could be measured: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    corr = correlations(rows)
    atomic_write_text(folder / "bound_summary.csv", summary_csv(rows))
    plotted = plot_terms(rows, corr, folder / "bound_vs_robust.png")
    plot_each_term(rows, corr, folder / PLOT_FOLDER)
    path = folder / "bound_summary.md"
    atomic_write_text(path, summary_markdown(folder, rows, corr, failed, plotted))
    return path, failed

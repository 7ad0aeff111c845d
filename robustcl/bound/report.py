"""The "Bound terms" section of a run's report: bound.md beside bound.json, included by runs/report.py."""
from __future__ import annotations

from typing import Any

from robustcl.objectives.divergences import DIVERGENCES
from robustcl.runs import RunDir, atomic_write_text


NAMES = {"js": "JS", "kl": "KL", "reverse_kl": "reverse KL", "pearson": "Pearson chi^2",
         "hellinger": "squared Hellinger"}


def _f(value: Any, digits: int = 4) -> str:
    """A number for a table cell ('-' for None)."""
    return "-" if value is None else f"{value:.{digits}g}"


def section_lines(bound: dict[str, Any]) -> list[str]:
    """Markdown lines of the section: the setting in words, the terms, phase-2 robust error and loss."""
    d, a, t = bound["data"], bound["attack"], bound["terms"]
    sharp, div = t["sharpness"], t["divergence"]
    critic = div["critic"]
    kind = "linear critic" if critic["hidden"] == 0 else f"critic with {critic['hidden']} hidden units"
    lines = ["## Bound terms", "",
             f"Measured by `robustcl bound` at phase-1 step {bound['checkpoint_step']}"
             f"{'' if bound.get('pretrain_finished') else ' (phase 1 not finished)'} on {d['images']} held-out "
             f"validation images ({d['batches']} batch{'es' if d['batches'] != 1 else ''} of {d['batch_size']}; never "
             "trained on in phase 1), "
             f"{bound['model_mode']}. Views: p {bound['views']['p']}, q {bound['views']['q']} (seed "
             f"{bound['views']['generator_seed']}); q' = PGD-{a['steps']} L-inf eps {a['eps']:.4g} step "
             f"{a['alpha']:.4g} on q maximising {a['objective']} ({a['source']}).", "",
             "| term | value |", "|---|---|",
             f"| benign InfoNCE NCE(z_b(p), z_b(q)) | {_f(t['benign_nce'])} |",
             f"| adversarial InfoNCE NCE(z_b(p), z_a(q')) | {_f(t['adversarial_nce'])} |"]
    for r in sharp["per_rho"]:
        lines.append(f"| sharpness, {sharp['mode'].upper()} rho={r['rho']:g}: max (SAM step) | {_f(r['max'])} "
                     f"({_f(r['sam_step'])}) |")
    for space in ("z", "h", "h_head"):
        s = div[space]
        for name in DIVERGENCES:
            extra = f", critic accuracy {100 * s[name]['critic_accuracy']:.1f}%" if name == "js" else ""
            lines.append(f"| {NAMES[name]} lower bound, {space} | {_f(s[name]['bound'])}{extra} |")
        lines.append(f"| MMD^2, {space} (bandwidth {_f(s['mmd_bandwidth'], 3)}, permutation p "
                     f"{_f(s['mmd_p_value'], 2)}) "
                     f"| {_f(s['mmd2'])} |")
    lines += ["", f"Sharpness: max over the ball {sharp['ball']} of L_b(theta + e) - L_b(theta) by {sharp['steps']} "
              f"projected gradient-ascent steps (the first is the SAM step; their max is a lower bound on the true "
              f"max) over {sharp['n_parameters']} parameters of f and g on the first {sharp['images']} images; there "
              f"L_b(theta) = {_f(sharp['base_loss'])}. Divergences between benign and adversarial features "
              f"in three pairings: z = {div['z']['features']}; h = {div['h']['features']}; h_head = "
              f"{div['h_head']['features']}. f-GAN lower bounds from a fresh "
              f"{kind} "
              f"(Adam, {critic['steps']} steps) fitted on 3/8 of the pairs, early-stopped on 1/8, reported on the "
              "held-out 1/2; MMD^2 unbiased, Gaussian kernel, median-heuristic bandwidth, paired permutation test.",
              ""]
    p2 = bound["phase2"]
    if "missing" in p2:
        lines += [f"Phase 2: missing ({p2['missing']}).", ""]
    else:
        lines += [f"Phase 2 ({p2['attack']} on the {p2.get('eval_subset')}):", "",
                  "| protocol | branch | robust error (%) | clean error (%) | robust CE loss |",
                  "|---|---|---|---|---|"]
        for protocol, r in p2["protocols"].items():
            lines.append(f"| {protocol.upper()} | {r['branch']} | {100 * r['robust_error']:.2f} | "
                         f"{100 * r['clean_error']:.2f} | {_f(r.get('robust_loss'))} |")
        lines.append("")
    if bound.get("geometry"):
        g = bound["geometry"]
        lines += [f"Feature geometry: {g['method']} of {g['features']} ({g['images']} images; PC1 and PC2 explain "
                  f"{100 * g['explained_variance'][0]:.1f}% and {100 * g['explained_variance'][1]:.1f}%). "
                  "t-SNE is not drawn (scikit-learn is not a dependency).", "",
                  f"![feature geometry]({g['path']})", ""]
    return lines


def write_section(run: RunDir, bound: dict[str, Any]) -> None:
    """bound.md; report.md is rebuilt (it includes bound.md) when the run has a report or results."""
    atomic_write_text(run.bound_section, "\n".join(section_lines(bound)))
    if run.report.is_file() or run.results.is_file():
        from robustcl.runs.report import write_report

        write_report(run)


def describe(bound: dict) -> str:
    """Three lines: the data, the headline terms, phase-2 robust error."""
    t, d = bound["terms"], bound["data"]
    sharp = ", ".join(f"rho={r['rho']:g}: {r['max']:.4g}" for r in t["sharpness"]["per_rho"])
    div = t["divergence"]
    p2 = bound["phase2"]
    robust = ("missing" if "missing" in p2 else
              ", ".join(f"{p.upper()} {100 * r['robust_error']:.2f}%" for p, r in p2["protocols"].items()))
    batches = f"{d['batches']} batch{'es' if d['batches'] != 1 else ''}"
    return (f"{bound['run']}: {d['images']} held-out images in {batches} of {d['batch_size']}\n"
            f"  benign NCE {t['benign_nce']:.4f}, adversarial NCE {t['adversarial_nce']:.4f}; sharpness "
            f"({t['sharpness']['mode']}) {sharp}\n"
            f"  JS bound z {div['z']['js']['bound']:.4f} h {div['h']['js']['bound']:.4f} h_head "
            f"{div['h_head']['js']['bound']:.4f}; MMD^2 z {div['z']['mmd2']:.4g} h {div['h']['mmd2']:.4g} h_head "
            f"{div['h_head']['mmd2']:.4g}; robust error {robust}")

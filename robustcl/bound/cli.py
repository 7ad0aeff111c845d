"""`robustcl bound`: measure the generalisation bound's terms for a run or every run of a sweep."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the measurement imports torch; `robustcl --help` must not
    from robustcl.bound.measure import BoundSettings


def settings_from(args: argparse.Namespace) -> BoundSettings:
    """BoundSettings from the parsed options, validated (one-line ConfigError)."""
    from robustcl.bound.measure import BoundSettings
    from robustcl.config import ConfigError

    settings = BoundSettings(images=args.images, batch_size=args.batch_size,
                             rho=tuple(args.rho) if args.rho else None, sharpness_mode=args.sharpness_mode,
                             sharpness_steps=args.sharpness_steps, sharpness_images=args.sharpness_images,
                             seed=args.seed, eps=args.eps, steps=args.steps,
                             alpha=args.alpha, critic_hidden=args.critic_hidden, critic_steps=args.critic_steps,
                             mmd_permutations=args.mmd_permutations, robust_loss=not args.no_robust_loss)
    settings.validate()
    if args.threads < 1:
        raise ConfigError(f"robustcl bound --threads {args.threads} must be >= 1")
    return settings


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


def cmd_bound(args: argparse.Namespace) -> int:
    """Measure one run (--run) or a sweep (--sweep); prints where the files are."""
    settings = settings_from(args)
    echo = (lambda _: None) if args.quiet else print
    if args.run:
        from robustcl.bound.measure import BOUND_FILE, measure_run

        bound, measured = measure_run(Path(args.run), settings, args.overwrite, args.geometry, args.threads)
        print(describe(bound))
        print(f"{'measured' if measured else 'reused'}: {Path(args.run) / BOUND_FILE}"
              + (f"; geometry: {Path(args.run) / bound['geometry']['path']}" if bound.get("geometry") else ""))
        return 0
    from robustcl.bound.summary import measure_sweep

    path, failed = measure_sweep(Path(args.sweep), settings, args.overwrite, args.geometry, echo, args.threads)
    print(f"summary: {path}")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bound` subcommand."""
    p = sub.add_parser("bound", help="measure the generalisation bound's terms (InfoNCE, sharpness, divergence) "
                                     "of a run or a sweep on held-out data")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="run directory (config.yaml + checkpoints/last.pt)")
    where.add_argument("--sweep", help="sweep directory (runs/sweeps/<spec>): every run, plus bound_summary.*")
    p.add_argument("--images", type=int, default=1000, help="held-out validation images (default 1000)")
    p.add_argument("--batch-size", type=int, default=250, help="InfoNCE batch size (default 250)")
    p.add_argument("--rho", type=float, nargs="+", help="sharpness radii (default asam: 0.1 0.5 1; sam: 0.01 0.05 0.1)")
    p.add_argument("--sharpness-mode", choices=["sam", "asam"], default="asam", help="the ball (default asam)")
    p.add_argument("--sharpness-steps", type=int, default=5, help="projected gradient-ascent steps (default 5)")
    p.add_argument("--sharpness-images", type=int, default=500,
                   help="images (first fixed batches) the sharpness is measured on (default 500)")
    p.add_argument("--seed", type=int, default=0, help="seed of views, attack noise and critics (default 0)")
    p.add_argument("--eps", type=float, help="attack eps (default: the run's phase-1 attack)")
    p.add_argument("--steps", type=int, help="attack steps (default: the run's phase-1 attack)")
    p.add_argument("--alpha", type=float, help="attack step size (default: the run's, scaled with --eps)")
    p.add_argument("--critic-hidden", type=int, default=0, help="critic hidden width, 0 = linear (default 0)")
    p.add_argument("--critic-steps", type=int, default=1000, help="critic Adam steps (default 1000)")
    p.add_argument("--mmd-permutations", type=int, default=200, help="permutations of the MMD test (default 200)")
    p.add_argument("--no-robust-loss", action="store_true", help="skip the phase-2 robust cross-entropy (a PGD pass)")
    p.add_argument("--geometry", action="store_true", help="also write plots/geometry.png (2-D PCA of features)")
    p.add_argument("--overwrite", action="store_true", help="re-measure runs that already have bound.json")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads while measuring (default 1)")
    p.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    p.set_defaults(fn=cmd_bound)

"""Measure the generalisation bound's phase-1 terms for one run; bound.json and the report's "Bound terms".

arXiv 2311.09671 bounds the robust risk of the phase-2 linear classifier by phase-1 quantities:
adversarial InfoNCE, benign InfoNCE, the sharpness of the benign loss and a divergence between
benign and adversarial representations. For a run directory (config.yaml + checkpoints/last.pt) this
module measures each of them on the run's held-out validation split (`train_val_indices`: the images
phase 1 never trained on), with the model in eval mode, in fp32, with views and attack noise drawn
from one seeded generator:

  * benign_nce = NCE(z_b(p), z_b(q)), adversarial_nce = NCE(z_b(p), z_a(q')), averaged over batches;
    p is the strong view, q the method's attacked view (attack_view, else strong), q' = PGD on q
    maximising NCE(z_b(p), z_a(q')) with the run's phase-1 budget (the critic term of gbrcl's attack
    is a training device and is left out: q' attacks the very loss that is reported);
  * sharpness of benign_nce over the f and g parameters on the same fixed batches (bound/sharpness.py);
  * divergences between benign (z_b(q), h_b(q)) and adversarial (z_a(q'), h_a(q')) features at the
    projection output z and the encoder output h: held-out f-GAN bounds from fresh critics and MMD^2
    (bound/estimates.py);
  * phase 2: robust error per protocol from results.json and, where heads exist, the robust
    cross-entropy at the evaluation's own PGD on its test subset.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from robustcl.bound.estimates import CriticSettings, critic_bounds, mmd2_unbiased, mmd_permutation_p
from robustcl.bound.report import write_section
from robustcl.bound.sharpness import sharpness_per_rho
from robustcl.config import AttackConfig, Config, ConfigError, load_config
from robustcl.methods import Method
from robustcl.objectives import info_nce, pgd
from robustcl.objectives.divergences import DIVERGENCES
from robustcl.runs import RunDir, RunError
from robustcl.runs.guard import writing
from robustcl.runs.loaders import checkpoint_fix, load_checkpoint, load_state_into
from robustcl.runs.progress import SILENT, Progress, Tick
from robustcl.views import strong_view, weak_view

GEOMETRY_FILE = "geometry.png"
DEFAULT_RHO: dict[str, tuple[float, ...]] = {"asam": (0.1, 0.5, 1.0), "sam": (0.01, 0.05, 0.1)}
SPACES = {"z": "projection output: z_b(q) = g(f_benign(q)) vs z_a(q') = g(f_adversarial(q')) (the training critic's)",
          "h": "encoder output: h_b(q) = f_benign(q) vs h_a(q') = f_adversarial(q')",
          "h_head": "encoder output through the phase-2 head's branch r: f_r(q) vs f_r(q')"}


@dataclass(frozen=True)
class BoundSettings:
    """What `robustcl bound` measures with; stored in bound.json, and a stored file is reused only if they match."""
    images: int = 1000
    batch_size: int = 250
    rho: tuple[float, ...] | None = None           # None: DEFAULT_RHO of the mode
    sharpness_mode: Literal["sam", "asam"] = "asam"
    sharpness_steps: int = 5
    sharpness_images: int = 500                    # the first batches holding this many of the images
    seed: int = 0
    eps: float | None = None                       # None: the run's phase-1 attack
    steps: int | None = None
    alpha: float | None = None                     # None: the run's alpha, scaled by eps / run eps
    critic_hidden: int = 0
    critic_steps: int = 1000
    mmd_permutations: int = 200
    robust_loss: bool = True

    def validate(self) -> None:
        """One-line ConfigError naming the bad option."""
        checks = [(self.images >= 8, "--images", self.images, ">= 8"),
                  (self.batch_size >= 2, "--batch-size", self.batch_size, ">= 2"),
                  (self.sharpness_steps >= 1, "--sharpness-steps", self.sharpness_steps, ">= 1"),
                  (self.sharpness_images >= 2, "--sharpness-images", self.sharpness_images, ">= 2"),
                  (all(r > 0 for r in self.rhos), "--rho", list(self.rhos), "all > 0"),
                  (self.eps is None or self.eps >= 0, "--eps", self.eps, ">= 0"),
                  (self.steps is None or self.steps >= 1, "--steps", self.steps, ">= 1"),
                  (self.alpha is None or self.alpha > 0, "--alpha", self.alpha, "> 0"),
                  (self.critic_hidden >= 0, "--critic-hidden", self.critic_hidden, ">= 0"),
                  (self.critic_steps >= 1, "--critic-steps", self.critic_steps, ">= 1"),
                  (self.mmd_permutations >= 0, "--mmd-permutations", self.mmd_permutations, ">= 0")]
        for ok, option, value, why in checks:
            if not ok:
                raise ConfigError(f"robustcl bound {option} {value} must be {why}")

    @property
    def rhos(self) -> tuple[float, ...]:
        """The radii: the given ones or the mode's defaults."""
        return tuple(self.rho) if self.rho else DEFAULT_RHO[self.sharpness_mode]

    def as_dict(self) -> dict[str, Any]:
        """JSON form with the radii resolved."""
        return {**asdict(self), "rho": list(self.rhos)}


# ------------------------------------------------------------------------------ loading
@dataclass
class LoadedRun:
    """A run's config, phase-1 model (checkpoints/last.pt) and held-out validation images."""
    run: RunDir
    cfg: Config
    method: Method
    device: torch.device
    images: torch.Tensor   # uint8 held-out validation images, on device
    labels: torch.Tensor
    val_size: int
    step: int
    finished: bool


def load_run(root: Path | str, images: int) -> LoadedRun:
    """Rebuild the run's method from config.yaml and checkpoints/last.pt; the first `images` validation images."""
    import robustcl.methods  # noqa: F401 - registers the methods configs are built with
    from robustcl.methods.factory import build_method
    from robustcl.runtime import resolve_device
    from robustcl.splits import load_split, train_val_indices

    run = RunDir(root)
    if not run.root.is_dir():
        raise RunError(f"{run.root} is not a directory; pass a run directory written by `robustcl pretrain`")
    if not run.config.is_file():
        raise RunError(f"{run.root} is not a robustcl run (no config.yaml); pass a run directory written by "
                       "`robustcl pretrain`")
    if not run.checkpoint.is_file():
        raise RunError(f"{run.root} has no checkpoints/last.pt (bound needs the phase-1 model f, g); run "
                       f"`robustcl pretrain --out {run.root} --resume` or `robustcl run` first")
    cfg = load_config(str(run.config))
    device = resolve_device(cfg.train.device)
    data = load_split(cfg, "train")
    _, val_idx = train_val_indices(len(data), cfg.data.val_size, cfg.seed)
    chosen = val_idx[:images]
    if len(chosen) < 8:
        raise RunError(f"{run.root} holds out only {len(chosen)} validation images (data.val_size); bound needs at "
                       "least 8 (the critics split them in halves): measure a run with a larger data.val_size")
    state = load_checkpoint(run.checkpoint, device)
    method = build_method(cfg, data.info.channels, data.info.mean, data.info.std).to(device)
    load_state_into(method, state["model"], run.checkpoint, checkpoint_fix(run.root))
    method.eval()
    return LoadedRun(run, cfg, method, device, data.images[chosen].to(device), data.labels[chosen].to(device),
                     len(val_idx), int(state.get("step", 0)), run.pretrain_done.is_file())


def resolve_attack(cfg: Config, method: Method, settings: BoundSettings) -> tuple[AttackConfig, str]:
    """The L-inf budget on q: the run's phase-1 attack (eval.attack for a method without one), options on top.

    A phase-1 FGSM-RS attack (mode fgsm-rs) is one step of 1.25 eps from a random start, i.e. PGD with
    steps=1, alpha=1.25 eps; --alpha defaults to the run's alpha scaled by --eps / the run's eps.
    """
    base = method.attack_config()
    source = "method.attack (the run's phase-1 attack)"
    if base is None:
        base, source = cfg.eval.attack, "eval.attack (the method has no phase-1 attack)"
    base_alpha = 1.25 * base.eps if base.mode == "fgsm-rs" else base.alpha
    eps = base.eps if settings.eps is None else settings.eps
    if settings.alpha is not None:
        alpha = settings.alpha
    elif settings.eps is not None and base.eps > 0:
        alpha = base_alpha * settings.eps / base.eps
    else:
        alpha = base_alpha
    steps = base.steps if settings.steps is None else settings.steps
    if (settings.eps, settings.steps, settings.alpha) != (None, None, None):
        source += ", changed by --eps/--steps/--alpha"
    return replace(base, eps=eps, alpha=alpha, steps=steps), source


# ------------------------------------------------------------------------------ features
@dataclass
class Collected:
    """Fixed views, features and the two InfoNCE terms of the held-out batches."""
    p: list[torch.Tensor]
    q: list[torch.Tensor]
    z_b: torch.Tensor
    z_a: torch.Tensor
    h_b: torch.Tensor
    h_a: torch.Tensor
    h_head_b: torch.Tensor  # f_r(q), f_r(q') through the phase-2 head's branch r
    h_head_a: torch.Tensor
    head_branch: str
    labels: torch.Tensor
    benign_nce: list[float]
    adversarial_nce: list[float]


def head_branch(method: Method, cfg: Config) -> str:
    """The BN branch phase 2 reads: finetune.branch resolved by the method (headline; benign without dual BN)."""
    return method.report_branch(cfg.finetune.branch)


def attacked_view(method: Method) -> str:
    """Which augmentation the method attacks (`Method.attack_view`: the strong view unless it says otherwise)."""
    return method.attack_view()


def collect(loaded: LoadedRun, attack: AttackConfig, batch_size: int, seed: int,
            tick: Tick | None = None) -> Collected:
    """Views p, q and q' = PGD(q) per batch (one seeded generator), features at z and h, and both InfoNCE terms
    (`tick(b)` after each batch of b images)."""
    method, cfg, device = loaded.method, loaded.cfg, loaded.device
    n = len(loaded.images)
    b = min(batch_size, n)
    n_batches = n // b
    gen = torch.Generator(device=device).manual_seed(seed)
    strong, weak, q_kind = cfg.views.strong, cfg.views.weak, attacked_view(method)
    tau = method.cfg.temperature
    views: dict[str, list[torch.Tensor]] = {"p": [], "q": []}
    nce: dict[str, list[float]] = {"benign": [], "adversarial": []}
    keys = ("z_b", "z_a", "h_b", "h_a", "h_head_b", "h_head_a")
    feats: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    head = head_branch(method, cfg)
    with method.evaluating():
        for i in range(n_batches):
            x = loaded.images[i * b:(i + 1) * b]
            p = strong_view(x, gen, strong)
            q = weak_view(x, gen, weak) if q_kind == "weak" else strong_view(x, gen, strong)
            with torch.no_grad():
                z_p = method.embed(p, "benign")

            def objective(x_adv: torch.Tensor) -> torch.Tensor:
                return info_nce(z_p, method.embed(x_adv, "adversarial"), tau)

            q_adv = pgd(objective, q, attack.eps, attack.alpha, attack.steps, attack.random_start, gen,
                        modules=[method])
            with torch.no_grad():
                h_b, h_a = method.encoder(q, "benign"), method.encoder(q_adv, "adversarial")
                z_b, z_a = method.projector(h_b), method.projector(h_a)
                h_head_b = h_b if head == "benign" else method.encoder(q, head)
                h_head_a = h_a if head == "adversarial" else method.encoder(q_adv, head)
                nce["benign"].append(info_nce(z_p, z_b, tau).item())
                nce["adversarial"].append(info_nce(z_p, z_a, tau).item())
            for key, value in zip(keys, (z_b, z_a, h_b, h_a, h_head_b, h_head_a)):
                feats[key].append(value.float().cpu())
            views["p"].append(p)
            views["q"].append(q)
            if tick is not None:
                tick(b)
    return Collected(views["p"], views["q"], *(torch.cat(feats[k]) for k in keys), head,
                     loaded.labels[:n_batches * b].cpu(), nce["benign"], nce["adversarial"])


def sharpness_batches(collected: Collected, images: int) -> int:
    """How many of the fixed batches the sharpness uses: those holding `images` images (at least one)."""
    return max(1, min(len(collected.p), images // collected.p[0].shape[0]))


def benign_loss_fn(method: Method, collected: Collected,
                   n: int) -> Callable[[bool], tuple[float, list[torch.Tensor] | None]]:
    """need_grad -> (mean benign InfoNCE over the first n fixed batches at the current parameters, its gradient)."""
    params = method.encoder_parameters()
    tau = method.cfg.temperature

    def loss_and_grad(need_grad: bool) -> tuple[float, list[torch.Tensor] | None]:
        total = 0.0
        grads = [torch.zeros_like(p) for p in params] if need_grad else None
        for p, q in zip(collected.p[:n], collected.q[:n]):
            with torch.set_grad_enabled(need_grad):
                z_p, z_q = method.embed(torch.cat([p, q]), "benign").chunk(2)
                loss = info_nce(z_p, z_q, tau) / n
            if grads is not None:
                for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                    if g is not None:
                        acc.add_(g)
            total += loss.item()
        return total, grads

    return loss_and_grad


# ------------------------------------------------------------------------------ the terms
def sharpness_terms(loaded: LoadedRun, collected: Collected, settings: BoundSettings) -> dict[str, Any]:
    """Sharpness of the benign InfoNCE per radius (eval-mode BN, fixed batches, f and g parameters)."""
    method = loaded.method
    params = method.encoder_parameters()
    n = sharpness_batches(collected, settings.sharpness_images)
    with method.evaluating():
        base, results = sharpness_per_rho(benign_loss_fn(method, collected, n), params, settings.rhos,
                                          settings.sharpness_steps, settings.sharpness_mode == "asam")
    ball = "||e / |theta| ||_2 <= rho" if settings.sharpness_mode == "asam" else "||e||_2 <= rho"
    return {"mode": settings.sharpness_mode, "ball": ball, "steps": settings.sharpness_steps,
            "parameters": "encoder f and projection head g", "n_parameters": sum(p.numel() for p in params),
            "images": n * collected.p[0].shape[0], "batches": n,
            "base_loss": base, "per_rho": [r.as_dict() for r in results]}


def divergence_terms(collected: Collected, settings: BoundSettings) -> dict[str, Any]:
    """Held-out critic bounds (every f-divergence) and MMD^2 between benign and adversarial features (SPACES)."""
    critic = CriticSettings(hidden=settings.critic_hidden, steps=settings.critic_steps, seed=settings.seed)
    out: dict[str, Any] = {"critic": {**asdict(critic), "fit": "3/8 of the pairs", "early_stopping": "1/8",
                                      "reported_on": "the other 1/2 (held out)"}}
    pairs = {"z": (collected.z_b, collected.z_a), "h": (collected.h_b, collected.h_a),
             "h_head": (collected.h_head_b, collected.h_head_a)}
    for space, (benign, adversarial) in pairs.items():
        bounds = critic_bounds(benign, adversarial, critic)
        mmd2, bandwidth = mmd2_unbiased(benign, adversarial, paired=True)
        p_value = (mmd_permutation_p(benign, adversarial, bandwidth, settings.mmd_permutations, settings.seed,
                                     paired=True) if settings.mmd_permutations > 0 else None)
        out[space] = {"features": SPACES[space].replace("branch r", f"branch r = {collected.head_branch}"),
                      "dim": int(benign.shape[1]),
                      **{name: bounds[name].as_dict() for name in DIVERGENCES},
                      "mmd2": mmd2, "mmd_bandwidth": bandwidth, "mmd_p_value": p_value,
                      "mean_feature_distance": float((benign - adversarial).norm(dim=1).mean())}
    return out


def robust_loss(run: RunDir, cfg: Config, protocol: str, device: torch.device,
                tick: Tick | None = None) -> dict[str, Any]:
    """Mean cross-entropy and accuracy under one pass of the evaluation's PGD (its subset, seed, batches), one model."""
    from robustcl.evaluation.robust import ce_objective
    from robustcl.evaluation.run_eval import protocol_model, test_subset
    from robustcl.export import read_encoder
    from robustcl.methods.factory import autocast_factory

    encoder, _ = read_encoder(run.encoder)
    encoder.to(device).eval().requires_grad_(False)
    model, _ = protocol_model(run, protocol, encoder, device)
    images, labels, _ = test_subset(cfg)
    a, e = cfg.eval.attack, cfg.eval
    autocast = autocast_factory(device, e.precision)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # as evaluate_run's first PGD pass
    loss_sum, correct = 0.0, 0
    for i in range(0, len(images), e.batch_size):
        x = images[i:i + e.batch_size].to(device).float().div(255)
        y = labels[i:i + e.batch_size].to(device)
        x_adv = pgd(ce_objective(model, y, autocast), x, a.eps, a.alpha, a.steps, a.random_start, gen,
                    modules=[model])
        with torch.no_grad(), autocast():
            logits = model(x_adv).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        if tick is not None:
            tick(len(y))
    return {"robust_loss": loss_sum / len(images), "robust_acc_recomputed": correct / len(images),
            "n_test": int(len(images))}


def phase2_terms(run: RunDir, cfg: Config, device: torch.device, with_loss: bool,
                 parts: Progress = SILENT) -> dict[str, Any]:
    """Robust error (1 - headline PGD accuracy) per protocol from results.json, plus the robust loss if asked
    (a part of `parts` per protocol)."""
    from robustcl.evaluation.run_eval import attack_name

    results = run.read_results()
    if not results.get("protocols"):
        return {"missing": f"no results.json with evaluated heads; run `robustcl finetune --run {run.root}` and "
                           f"`robustcl evaluate --run {run.root}`"}
    a = results["attack"]
    restarts = int(a.get("restarts", 1))
    key = attack_name(a["steps"], a["eps"], restarts=restarts)
    out: dict[str, Any] = {"attack": key, "eval_subset": results.get("eval_subset"), "protocols": {}}
    for protocol, r in results["protocols"].items():
        acc = r["robust"].get(key, next(iter(r["robust"].values())))
        entry: dict[str, Any] = {"branch": r["branch"], "robust_error": 1 - acc, "clean_error": 1 - r["clean_acc"]}
        if with_loss and run.head(protocol).is_file() and run.encoder.is_file():
            with parts.part(f"{protocol}/robust loss", int(results.get("n_eval") or 0)) as part:
                entry.update(robust_loss(run, cfg, protocol, device, part.update))
            if restarts == 1:  # one PGD pass with the evaluation's seed: the same accuracy as results.json
                entry["recomputed_matches_results"] = math.isclose(entry["robust_acc_recomputed"], acc, abs_tol=1e-9)
        out["protocols"][protocol] = entry
    return out


# ------------------------------------------------------------------------------ one run
def measure(loaded: LoadedRun, settings: BoundSettings, collected: Collected | None = None,
            parts: Progress = SILENT) -> dict[str, Any]:
    """Every term for a loaded run: the content of bound.json (wall-clock timing under "seconds"); each stage a
    part of `parts` (a bar, a line or nothing), counted in the held-out images it uses."""
    t0 = time.perf_counter()
    attack, source = resolve_attack(loaded.cfg, loaded.method, settings)
    if collected is None:
        collected = collect_part(loaded, attack, settings, parts)
    n_batches = len(collected.p)
    b = collected.p[0].shape[0]
    result: dict[str, Any] = {
        "run": loaded.run.root.name, "method": loaded.cfg.method.name, "dataset": loaded.cfg.data.name,
        "checkpoint_step": loaded.step, "pretrain_finished": loaded.finished, "settings": settings.as_dict(),
        "data": {"split": "validation split held out from phase 1 (train_val_indices)", "val_size": loaded.val_size,
                 "images": n_batches * b, "batches": n_batches, "batch_size": b},
        "views": {"p": "strong", "q": attacked_view(loaded.method), "generator_seed": settings.seed},
        "attack": {**asdict(attack), "source": source, "objective": "NCE(z_b(p), z_a(q'))",
                   "norm": "Linf"},
        "model_mode": "eval (BN running statistics), fp32",
        "terms": {"benign_nce": sum(collected.benign_nce) / n_batches,
                  "adversarial_nce": sum(collected.adversarial_nce) / n_batches,
                  "benign_nce_per_batch": collected.benign_nce, "adversarial_nce_per_batch": collected.adversarial_nce},
    }
    seconds = {"features_and_attack": time.perf_counter() - t0}
    t1 = time.perf_counter()
    with parts.part("sharpness", sharpness_batches(collected, settings.sharpness_images) * b):
        result["terms"]["sharpness"] = sharpness_terms(loaded, collected, settings)
    seconds["sharpness"], t1 = time.perf_counter() - t1, time.perf_counter()
    with parts.part("divergence", n_batches * b):
        result["terms"]["divergence"] = divergence_terms(collected, settings)
    seconds["divergence"], t1 = time.perf_counter() - t1, time.perf_counter()
    result["phase2"] = phase2_terms(loaded.run, loaded.cfg, loaded.device, settings.robust_loss, parts)
    seconds["phase2"] = time.perf_counter() - t1
    result["seconds"] = {"total": time.perf_counter() - t0, **seconds}
    return result


def collect_part(loaded: LoadedRun, attack: AttackConfig, settings: BoundSettings, parts: Progress) -> Collected:
    """`collect` as the part "features and attack" of `parts`."""
    n = len(loaded.images)
    b = min(settings.batch_size, n)
    with parts.part("features and attack", n // b * b) as part:
        return collect(loaded, attack, settings.batch_size, settings.seed, part.update)


def first_setting_difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """'key stored -> wanted' for the first differing setting, None when equal."""
    for key in sorted(set(stored) | set(wanted)):
        if stored.get(key) != wanted.get(key):
            return f"{key} {stored.get(key)!r} -> {wanted.get(key)!r}"
    return None


def read_bound(run: RunDir) -> dict[str, Any] | None:
    """The run's bound.json, or None."""
    import json

    path = run.bound
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunError(f"{path} is not valid JSON; re-measure with `robustcl bound --run {run.root} --overwrite`") \
            from None


def reusable(run: RunDir, settings: BoundSettings, overwrite: bool) -> dict[str, Any] | None:
    """The stored bound.json when it was measured with these settings; RunError if with others (unless overwrite)."""
    stored = None if overwrite else read_bound(run)
    if stored is None:
        return None
    diff = first_setting_difference(stored.get("settings", {}), settings.as_dict())
    if diff:
        raise RunError(f"{run.bound} was measured with other settings ({diff}); pass --overwrite to "
                       "re-measure or use the same options")
    return stored


def measure_run(root: Path | str, settings: BoundSettings, overwrite: bool = False, geometry: bool = False,
                threads: int = 1, parts: Progress = SILENT) -> tuple[dict[str, Any], bool]:
    """bound.json for one run (reused when present with the same settings), the report section; (bound, measured).

    Runs with `threads` torch threads (restored after): on a shared CPU one thread is both faster for the
    many small critic steps and reproducible bit for bit.
    """
    run = RunDir(root)
    stored = reusable(run, settings, overwrite) if run.root.is_dir() else None
    if stored is not None and (not geometry or stored.get("geometry")):
        return stored, False
    if not run.root.is_dir():
        raise RunError(f"{run.root} is not a directory; pass a run directory written by `robustcl pretrain`")
    with writing(run.root, "bound.json and its report section"):  # before any work: writable, one writer
        return _measure_and_write(run, settings, stored, geometry, threads, parts)


def _measure_and_write(run: RunDir, settings: BoundSettings, stored: dict[str, Any] | None, geometry: bool,
                       threads: int, parts: Progress = SILENT) -> tuple[dict[str, Any], bool]:
    """`measure_run`'s work, once the run is known writable and locked."""
    root = run.root
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = load_run(root, settings.images)
        attack, _ = resolve_attack(loaded.cfg, loaded.method, settings)
        t0 = time.perf_counter()
        collected = collect_part(loaded, attack, settings, parts)
        collect_seconds = time.perf_counter() - t0
        if stored is None:
            bound = {**measure(loaded, settings, collected, parts), "threads": threads}
            bound["seconds"]["features_and_attack"] = collect_seconds
            bound["seconds"]["total"] += collect_seconds
        else:
            bound = stored
        if geometry:
            from robustcl.bound.geometry import plot_geometry

            title = (f"{run.root.name} (step {loaded.step}): encoder features h = f(x) of {len(collected.h_b)} "
                     f"held-out images; benign q vs PGD-{attack.steps} q' (eps {attack.eps:.4g}), shared PCA")
            ratio = plot_geometry(collected.h_b, collected.h_a, collected.labels, run.plots / GEOMETRY_FILE, title)
            bound["geometry"] = {"path": f"plots/{GEOMETRY_FILE}", "features": SPACES["h"].split(": ")[1],
                                 "method": "PCA (SVD)",
                                 "explained_variance": ratio, "images": len(collected.h_b),
                                 "tsne": "not offered: scikit-learn is not a dependency"}
    finally:
        torch.set_num_threads(previous)
    bound = finite_json(bound)
    run.write_json(run.bound, bound)
    write_section(run, bound)
    return bound, stored is None


def finite_json(value: Any) -> Any:
    """A copy with every inf/nan float replaced by None, so bound.json is standard JSON (null = not finite)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value

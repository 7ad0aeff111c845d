"""2-D PCA of benign and adversarial features of one checkpoint, coloured by class (plots/geometry.png).

One PCA basis is fitted on the pooled benign + adversarial features (centred, SVD), so the two
panels share axes and a shift between them is visible. t-SNE is not offered: scikit-learn is not a
dependency of robustcl.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from robustcl.runs import atomic_write_bytes


def pca_2d(benign: torch.Tensor, adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Both samples projected on the top two principal axes of their union; plus the explained-variance ratios."""
    pooled = torch.cat([benign, adversarial]).double()
    mean = pooled.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(pooled - mean, full_matrices=False)
    basis = vh[:2].T
    # the sign of a singular vector is arbitrary: fix it so each axis's largest-magnitude loading is positive
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * signs
    ratio = (s ** 2 / (s ** 2).sum())[:2].tolist()
    return (benign.double() - mean) @ basis, (adversarial.double() - mean) @ basis, ratio


def plot_geometry(benign: torch.Tensor, adversarial: torch.Tensor, labels: torch.Tensor, path: Path,
                  title: str) -> list[float]:
    """Two panels (benign, adversarial) of the shared 2-D PCA, points coloured by class; returns variance ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pb, pa, ratio = pca_2d(benign, adversarial)
    both = torch.cat([pb, pa])
    lo, hi = both.min(0).values, both.max(0).values
    pad = 0.05 * (hi - lo).clamp_min(1e-9)
    lo, hi = (lo - pad).tolist(), (hi + pad).tolist()
    pb, pa, labels = pb.numpy(), pa.numpy(), labels.cpu().numpy()
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    for ax, points, name, marker in ((axes[0], pb, "benign", "o"), (axes[1], pa, "adversarial", "x")):
        for i, c in enumerate(classes):
            sel = labels == c
            ax.scatter(points[sel, 0], points[sel, 1], s=7, marker=marker, color=cmap(i % cmap.N), label=str(c),
                       alpha=0.7, linewidths=0.6)
        ax.set_title(f"{name} features")
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    axes[1].legend(title="class", fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return ratio

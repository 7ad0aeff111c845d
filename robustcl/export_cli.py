"""`robustcl export`: one BN branch of a run's ResNet encoder as a plain torchvision-layout state dict."""
from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("torchvision",)


def cmd_export(args: argparse.Namespace) -> int:
    from robustcl.export import export_torchvision
    from robustcl.runs import RunError

    try:
        done = export_torchvision(Path(args.run), args.branch, args.out)
    except ValueError as exc:  # not a ResNet, or not a robustcl encoder file
        raise RunError(str(exc)) from None
    print(f"{done['path']}: {done['arch']} ({done['stem']} stem), {done['branch']} BN branch, torchvision key names, "
          f"no fc (load with strict=False or after model.fc = nn.Identity()); normalise inputs with "
          f"mean={done['mean']} std={done['std']} (not stored in the file)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `robustcl export` to the command line."""
    p = sub.add_parser("export", help="write one BN branch of a run's ResNet encoder as a torchvision state dict")
    p.add_argument("--run", required=True, help="run directory or encoder.safetensors file")
    p.add_argument("--branch", default="headline", choices=["headline", "benign", "adversarial"],
                   help="BN branch to export (default: the one the method is reported through)")
    p.add_argument("--format", default="torchvision", choices=FORMATS,
                   help="torchvision: conv1/bn1/layerI.J.*/downsample.* names, saved with torch.save")
    p.add_argument("--out", help="output file (default resnet-<branch>.pth beside the encoder)")
    p.set_defaults(fn=cmd_export)


__all__ = ["register"]

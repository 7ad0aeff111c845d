"""Digest of a proof directory: sha256 of every encoder/head tensor file, results.json minus wall times, summary."""
import hashlib, json, sys, re
from pathlib import Path
import torch
SKIP = re.compile(r"(seconds|second|wall|time|hardware|images_per_s|duration|started|finished|elapsed|date|host)", re.I)
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in sorted(x.items()) if not SKIP.search(k)}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x
def tensors(obj, prefix=""):
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = hashlib.sha256(obj.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors(v, f"{prefix}[{i}]"))
    return out
root = Path(sys.argv[1]); d = {}
for p in sorted(root.rglob("*")):
    rel = str(p.relative_to(root))
    if p.name.endswith(".safetensors"):
        d[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    elif p.suffix == ".pt" and "heads" in p.parts:
        d[rel] = tensors(torch.load(p, map_location="cpu", weights_only=False))
    elif p.name == "results.json":
        d[rel] = clean(json.loads(p.read_text()))
    elif p.name in ("summary.csv", "summary_stats.csv", "summary_differences.csv"):
        rows = p.read_text().splitlines()
        d[rel] = rows
print(json.dumps(d, indent=1, sort_keys=True, default=str))

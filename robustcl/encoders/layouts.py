"""Published robust-SSL checkpoint layouts: how each training script names its tensors, as small tables.

Each `Layout` says, from the public code that wrote the files (repository and commit in `source`):
- `detect(keys)`: whether a state dict is of this layout, by its keys (never by the file's name);
- `map(key)`: the robustcl Encoder key a file key fills, a `Drop` naming the layout's rule that leaves it
  out (projection heads, a teacher, a BN copy not evaluated), or None (unmatched: the reading fails).
A BN copy is written `#i` in a mapped key (the file's copy index i); `assign_copies` says which copy fills
robustcl's benign and adversarial branches. robustcl/encoders/published.py does the strict reading.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

FIELD = r"(?P<field>weight|bias|running_mean|running_var|num_batches_tracked)"
BLOCK = r"(?P<blk>layer[1-4]\.\d+)"
STAT = (r"normalize\.(?P<stat>mean|std)", "{stat}")  # NormalizeByChannelMeanStd's buffers: robustcl's mean/std


@dataclass(frozen=True)
class Drop:
    """A file tensor left out by a named rule of its layout."""
    rule: str


@dataclass(frozen=True)
class Layout:
    """One published layout (see the module docstring); `fields` are the checkpoint's other top-level entries
    (training state: read, never used), `classes` what its pickle may hold beyond tensors and containers."""
    name: str
    title: str
    source: str
    signature: tuple[str, ...]                  # keys every file of the layout has
    rules: tuple[tuple[str, str], ...]          # (regex on the key without `prefix`, robustcl key template)
    drops: tuple[tuple[str, str], ...] = ()     # (regex on the whole key, the rule's name)
    excludes: tuple[str, ...] = ()              # keys no file of the layout has
    prefix: str = ""
    bn_copies: tuple[str, ...] = ()             # the file's BN copies by index, as its code names them; () one BN
    normalisation: str = "buffers"              # buffers: the file's normalize.*; none: raw [0, 1]; given: --mean/--std
    stem_padding: int = 1                       # of the 3x3 stem; weights cannot show it, the layout's code does
    identity_shortcut: bool = True
    features: str = "raw pooled features (global average of layer4)"
    weights: tuple[str, ...] = ()               # checkpoint entries that may hold the state dict; () the top level
    fields: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    optional_counts: bool = False               # num_batches_tracked may be absent (torchvision files before torch 0.4.1)
    methods: tuple[str, ...] = ()

    def detect(self, keys: Collection[str]) -> bool:
        return all(k in keys for k in self.signature) and not any(k in keys for k in self.excludes)

    def map(self, key: str) -> str | Drop | None:
        for pattern, rule in self.drops:
            if re.fullmatch(pattern, key):
                return Drop(rule)
        if not key.startswith(self.prefix):
            return None
        inner = key[len(self.prefix):]
        for pattern, template in self.rules:
            found = re.fullmatch(pattern, inner)
            if found:
                return template.format(**found.groupdict())
        return None


def bn_rules(bn: str, downsample: tuple[str, str], stats: bool = True) -> tuple[tuple[str, str], ...]:
    """A CIFAR ResNet's rules: BN copies named by the regex `bn` (after the BN's own name; "" single BN),
    the shortcut's conv and BN names `downsample`."""
    conv, norm = downsample
    single = bn == ""
    copy = "#0" if single else "#{bn}"
    return ((STAT,) if stats else ()) + (
        (r"conv1\.weight", "backbone.conv1.weight"),
        (rf"bn1\.{bn}{FIELD}", f"backbone.bn1.{copy}.{{field}}"),
        (rf"{BLOCK}\.conv(?P<n>[123])\.weight", "backbone.{blk}.conv{n}.weight"),
        (rf"{BLOCK}\.bn(?P<n>[123])\.{bn}{FIELD}", f"backbone.{{blk}}.bn{{n}}.{copy}.{{field}}"),
        (rf"{BLOCK}\.{conv}\.weight", "backbone.{blk}.shortcut_conv.weight"),
        (rf"{BLOCK}\.{norm}\.{bn}{FIELD}", f"backbone.{{blk}}.shortcut_bn.{copy}.{{field}}"),
    )


def any_of(prefix: str, rules: tuple[tuple[str, str], ...], *more: str) -> str:
    """A regex matching `prefix` + a key that one of `rules` (or `more`) matches: a whole second network dropped
    only when every key of it is one of the layout's own (a damaged copy is still an error)."""
    plain = [re.sub(r"\(\?P<\w+>", "(?:", pattern) for pattern, _ in rules] + list(more)
    return re.escape(prefix) + "(?:" + "|".join(plain) + ")"


BN_LIST = r"bn_list\.(?P<bn>\d+)\."
ACL_RULES = bn_rules(BN_LIST, (r"downsample\.conv", r"downsample\.bn"))
ACL_HEAD = (r"fc\.(fc[123]\.(weight|bias)|bn[123]\.bn_list\.\d+\." + FIELD + ")",
            "the projection head fc.* (3 linear layers with dual BatchNorm1d)")
ACL_FIELDS = ("epoch", "optim", "acc", "tacc", "rtacc")  # model_N.pt: acc, tacc (ACL); rtacc too (DynACL)
TV_RULES = bn_rules("", (r"downsample\.0", r"downsample\.1"))
LIGHTNING = ("epoch", "global_step", "pytorch-lightning_version", "callbacks", "optimizer_states", "lr_schedulers",
             "native_amp_scaling_state", "hparams_name", "hyper_parameters", "loops")

ACL = Layout(
    "acl", "ACL family: ACL, DynACL's model_encoder_k.pt, DynACL-AIR, DynACL-RCS, ASTrA (dual BN bn_list.{0,1})",
    "VITA-Group/Adversarial-Contrastive-Learning@399eabd", ("conv1.weight", "bn1.bn_list.1.weight"), ACL_RULES,
    (ACL_HEAD,), excludes=("bn1.bn_list.2.weight",), bn_copies=("normal", "pgd"), weights=("state_dict",),
    fields=ACL_FIELDS, methods=("ACL", "DynACL", "DynACL-AIR", "DynACL-RCS", "ASTrA"))
DYNACL = Layout(
    "dynacl", "DynACL model.pt: encoder_q and encoder_k, each an ACL-family network; encoder_k is evaluated",
    "PKU-ML/DYNACL@7d143db", ("encoder_k.conv1.weight", "encoder_q.conv1.weight", "encoder_k.bn1.bn_list.1.weight"),
    ACL_RULES, ((any_of("encoder_q.", ACL_RULES, ACL_HEAD[0]), "the online encoder encoder_q.* (DynACL evaluates "
                 "the momentum encoder encoder_k)"), (r"encoder_k\." + ACL_HEAD[0], "encoder_k's projection head fc.*")),
    prefix="encoder_k.", bn_copies=("normal", "pgd"), weights=("state_dict",), fields=ACL_FIELDS, methods=("DynACL",))
ADVCL = Layout(
    "advcl", "AdvCL and A-InfoNCE: DataParallel module., triple BN bn_list.{0,1,2}, pseudo-label heads",
    "LijieFan/AdvCL@24cb7a6", ("module.conv1.weight", "module.bn1.bn_list.2.weight"),
    bn_rules(BN_LIST, (r"downsample\.conv", r"downsample\.bn"), stats=False),
    ((r"module\.fc_(002|010|050|100|500)\.(weight|bias)", "the pseudo-label heads fc_{002,010,050,100,500}"),
     (r"module\.head_(ce|proj|pred)\.(0|3)\.(weight|bias)|module\.head_(ce|proj|pred)\.1\." + FIELD,
      "the heads head_ce, head_proj, head_pred")),
    prefix="module.", bn_copies=("normal", "pgd", "pgd_ce"), normalisation="none", weights=("model",),
    fields=("epoch", "rng_state"), methods=("AdvCL", "A-InfoNCE"))
DEACL = Layout(
    "deacl", "DeACL (solo-learn, PyTorch Lightning): backbone. student, momentum_backbone. teacher, padding-2 stem",
    "pantheon5100/DeACL@3fb81e3", ("backbone.conv1.weight", "momentum_backbone.conv1.weight"), TV_RULES,
    ((any_of("momentum_backbone.", TV_RULES), "the clean SimCLR teacher momentum_backbone.* (DeACL evaluates the student "
      "backbone.*)"), (r"classifier(_adv)?\.(weight|bias)", "the online linear classifiers classifier, classifier_adv")),
    prefix="backbone.", stem_padding=2, weights=("state_dict",), fields=LIGHTNING, methods=("DeACL",))
ROCL = Layout(
    "rocl", "RoCL: DataParallel module., single BN, shortcut.{0,1}, no normalisation",
    "Kim-Minseon/RoCL@b6d5185", ("module.conv1.weight", "module.bn1.weight", "module.layer2.0.shortcut.0.weight"),
    bn_rules("", (r"shortcut\.0", r"shortcut\.1"), stats=False), prefix="module.", normalisation="none",
    features="avg_pool2d(layer4, 4) (the global average at 32x32)", weights=("model",),
    fields=("epoch", "acc", "optimizer_state", "rng_state"), methods=("RoCL",))
GBRCL = Layout(
    "gbrcl", "the seed paper's code: encoder.bnX.{0,1}, projection shortcut conv3/bn3, no identity shortcut",
    "tunglamlqddb/Generalization-Bounds-for-Robust-Contrastive-Learning@e574b92",
    ("encoder.conv1.weight", "encoder.bn1.1.weight", "encoder.layer2.0.conv3.weight"),
    (STAT, (r"conv1\.weight", "backbone.conv1.weight"),
     (rf"bn1\.(?P<bn>\d+)\.{FIELD}", "backbone.bn1.#{bn}.{field}"),
     (rf"{BLOCK}\.conv(?P<n>[12])\.weight", "backbone.{blk}.conv{n}.weight"),
     (rf"{BLOCK}\.bn(?P<n>[12])\.(?P<bn>\d+)\.{FIELD}", "backbone.{blk}.bn{n}.#{bn}.{field}"),
     (rf"{BLOCK}\.conv3\.weight", "backbone.{blk}.shortcut_conv.weight"),
     (rf"{BLOCK}\.bn3\.(?P<bn>\d+)\.{FIELD}", "backbone.{blk}.shortcut_bn.#{bn}.{field}")),
    ((r"head\.[02]\.(weight|bias)", "the projector head.{0,2}"),
     (r"fc\.(weight|bias)", "the linear head fc (robustcl fits its own)")),
    prefix="encoder.", bn_copies=("clean", "adversarial"), identity_shortcut=False,
    features="L2-normalised pooled features", weights=("model",),
    fields=("args", "epoch", "discriminator", "optimizer", "d_optimizer"), classes=("argparse.Namespace",),
    methods=("GBRCL",))
TV_DROP = ((r"fc\.(weight|bias)", "the classifier fc (robustcl fits its own heads)"),)
LPAFT = Layout(
    "lpaft", "DynACL++ / LP-AFT single-BN output: torchvision names, normalize.* buffers, pseudo-label fc",
    "PKU-ML/DYNACL@7d143db", ("conv1.weight", "bn1.weight", "normalize.mean"), TV_RULES,
    ((r"fc\.(weight|bias)", "the pseudo-label head fc (LP-AFT's)"),), weights=("state_dict", "model"),
    fields=("epoch", "optim"), methods=("DynACL++", "DynACL-AIR++"))
TORCHVISION = Layout(
    "torchvision", "torchvision ResNet-18/50 names (downsample.0/1), one optional prefix, no normalisation inside",
    "pytorch/vision resnet.py", ("conv1.weight", "bn1.weight"), TV_RULES[1:], TV_DROP,
    excludes=("normalize.mean",), normalisation="given", weights=("state_dict", "model"), fields=("epoch",),
    optional_counts=True)

# Detection order: the specific before the general (no two of them match one file; torchvision last).
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (DYNACL, ADVCL, ACL, DEACL, ROCL, GBRCL, LPAFT,
                                                                 TORCHVISION)}


def with_prefix(layout: Layout, prefix: str) -> Layout:
    """The torchvision layout under one prefix ("module.", "backbone.", ...): its keys and drops shifted."""
    from dataclasses import replace

    drops = tuple((re.escape(prefix) + pattern, rule) for pattern, rule in layout.drops)
    return replace(layout, prefix=prefix, drops=drops, signature=tuple(prefix + k for k in layout.signature),
                   excludes=tuple(prefix + k for k in layout.excludes))


def torchvision_prefix(keys: Collection[str]) -> str | None:
    """The one prefix p with p + conv1.weight and p + layer1.0.conv1.weight among `keys` (None: none or several)."""
    stem = "conv1.weight"
    found = {k[: -len(stem)] for k in keys if k.endswith(stem) and f"{k[: -len(stem)]}layer1.0.conv1.weight" in keys}
    return found.pop() if len(found) == 1 else None


def detect(keys: Collection[str]) -> Layout | None:
    """The layout of a state dict's keys, or None."""
    for layout in LAYOUTS.values():
        if layout.name == "torchvision":
            prefix = torchvision_prefix(keys)
            layout = with_prefix(layout, prefix) if prefix else layout
        if layout.detect(keys):
            return layout
    return None


def copy_names(layout: Layout) -> str:
    return ", ".join(f"{i} = {name}" for i, name in enumerate(layout.bn_copies))


def assign_copies(layout: Layout, bn_branch: str | int | None) -> tuple[dict[int, str], str, dict[int, str]]:
    """(file BN copy -> robustcl branch, the branch read by default, copy -> the rule dropping it) for
    --bn-branch `bn_branch`: benign, adversarial (the default: copy 1 in every dual- or triple-BN layout) or a copy
    index; a copy index 2 (AdvCL's pgd_ce) fills robustcl's adversarial branch in copy 1's place."""
    if not layout.bn_copies:
        if bn_branch not in (None, "benign", 0, "0"):
            raise ValueError(f"layout {layout.name} has one set of BN statistics; --bn-branch {bn_branch} does not "
                             "apply (leave it out)")
        return {0: "benign"}, "benign", {}
    choice = {"benign": 0, "adversarial": 1, None: 1}.get(bn_branch) if not str(bn_branch).isdigit() else int(bn_branch)
    if choice is None or not 0 <= choice < len(layout.bn_copies):
        raise ValueError(f"--bn-branch {bn_branch}: layout {layout.name} has BN copies {copy_names(layout)}; "
                         "give benign, adversarial or one of those indices")
    copies = {0: "benign", max(choice, 1): "adversarial"}
    why = {i: f"BN copy {i} '{name}' (not read: robustcl reads copies {sorted(copies)})"
           for i, name in enumerate(layout.bn_copies) if i not in copies}
    if layout.name == "advcl" and 2 in why:
        why[2] = "BN copy 2 'pgd_ce' (AdvCL's pseudo-label adversarial branch, never evaluated)"
    return copies, "benign" if choice == 0 else "adversarial", why


def resolve_copy(key: str, copies: dict[int, str], dropped: dict[int, str]) -> str | Drop | None:
    """A mapped key with its `#i` replaced by the branch copy i fills, the rule dropping copy i, or None (a copy
    the layout does not have: unmatched)."""
    found = re.search(r"\.#(\d+)\.", key)
    if found is None:
        return key
    index = int(found.group(1))
    if index in copies:
        return key.replace(found.group(0), f".{copies[index]}.")
    return Drop(dropped[index]) if index in dropped else None


__all__ = ["LAYOUTS", "Drop", "Layout", "assign_copies", "detect", "resolve_copy",
           "torchvision_prefix", "with_prefix"]

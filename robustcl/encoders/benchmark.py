"""The RobustSSL benchmark's per-method phase-2 settings, as robustcl overrides (`--protocol-of benchmark`).

From `setup_hyperparameter(args, mode)` and the argument defaults of GodXuxilie/RobustSSL_Benchmark @ 19dc714,
Finetuning_Methods/Vanilla_Finetuning/{utils.py, vanilla_finetuning.py}, CIFAR-10 and CIFAR-100: SGD, momentum
0.9, weight decay 2e-4, 25 epochs unless set, training PGD eps 8/255 step 2/255 10 steps, test PGD-20 step
2/255 and AutoAttack (standard). What robustcl's phase 2 does not take from it, stated in every result
(`DIFFERENCES`): the learning rate follows robustcl's cosine schedule, not MultiStepLR at the benchmark's
milestones (x0.1), and the epoch is chosen on robustcl's validation split, where the benchmark keeps the last.
"""
from __future__ import annotations

from typing import Any

from robustcl.encoders.errors import EncoderError

COMMON = {"momentum": 0.9, "weight_decay": 2e-4, "epochs": 25}
ATTACK = ("finetune.attack.eps=8/255", "finetune.attack.alpha=2/255", "finetune.attack.steps=10")
ACL_LIKE = {"slf": {"cifar10": (512, 0.01), "cifar100": (512, 0.05)}}
# method -> protocol -> dataset -> (batch size, lr[, epochs]); milestones per method and protocol
SETTINGS: dict[str, dict[str, Any]] = {
    "ACL": {"slf": ACL_LIKE["slf"], "alf": ACL_LIKE["slf"], "aff": {"*": (128, 0.1, 100)},
            "milestones": {"slf": (10, 20), "alf": (10, 20), "aff": (40, 60)}},
    **{m: {"slf": ACL_LIKE["slf"], "alf": ACL_LIKE["slf"], "aff": {"*": (128, 0.1)},
           "milestones": {"slf": (10, 20), "alf": (10, 20), "aff": (15, 20)}}
       for m in ("DynACL", "DynACL++", "DynACL-RCS")},
    **{m: {"slf": {"*": (512, 0.01)}, "alf": {"*": (512, 0.01)}, "aff": {"*": (128, 0.1)},
           "milestones": {"slf": (15, 20), "alf": (15, 20), "aff": (15, 20)}} for m in ("AdvCL", "A-InfoNCE", "DeACL")},
    "DynACL-AIR": {"slf": {"cifar10": (512, 0.01, 5), "cifar100": (512, 0.1)},
                   "alf": {"cifar10": (512, 0.01), "cifar100": (512, 0.1)}, "aff": {"*": (128, 0.1)},
                   "milestones": {"slf": (10, 20), "alf": (10, 20), "aff": (15, 20)}},
    "DynACL-AIR++": {"slf": {"cifar10": (512, 0.01), "cifar100": (512, 0.09)},
                     "alf": {"cifar10": (512, 0.01, 4), "cifar100": (512, 0.1)}, "aff": {"*": (128, 0.1)},
                     "milestones": {"slf": (10, 20), "alf": (10, 20), "aff": (15, 20)}},
}
LAYOUT_METHOD = {"acl": "ACL", "dynacl": "DynACL", "advcl": "AdvCL", "deacl": "DeACL"}
DIFFERENCES = ("learning rate: robustcl's cosine schedule, not the benchmark's MultiStepLR (x0.1 at the milestones "
               "given)", "epoch: chosen on robustcl's validation split; the benchmark keeps the last epoch")


def settings(method: str, data: str, protocol: str) -> dict[str, Any]:
    """The benchmark's batch size, lr, epochs and milestones of `method` fine-tuned with `protocol` on `data`."""
    if method not in SETTINGS:
        raise EncoderError(f"--protocol-of benchmark: the benchmark sets no hyper-parameters for {method!r}; known: "
                           f"{', '.join(SETTINGS)} (name the catalogue entry with --compare NAME)")
    table = SETTINGS[method][protocol]
    row = table.get(data, table.get("*"))
    if row is None:
        raise EncoderError(f"--protocol-of benchmark: the benchmark's settings cover {', '.join(table)} for "
                           f"{method} {protocol.upper()}, not {data}")
    batch, lr, epochs = (*row, COMMON["epochs"])[:3]
    return {"method": method, "protocol": protocol, "batch_size": batch, "lr": lr, "epochs": epochs,
            "momentum": COMMON["momentum"], "weight_decay": COMMON["weight_decay"],
            "milestones": list(SETTINGS[method]["milestones"][protocol])}


def overrides(method: str, data: str, protocol: str) -> list[str]:
    """`settings` as robustcl config overrides (finetune.* for SLF/ALF, finetune.aff.* for AFF)."""
    s = settings(method, data, protocol)
    section = "finetune.aff" if protocol == "aff" else "finetune"
    keys = [f"{section}.{k}={s[k]}" for k in ("batch_size", "lr", "epochs", "momentum", "weight_decay")]
    if protocol == "aff":
        return [*keys, "finetune.aff.loss=trades", "finetune.aff.beta=6.0"]
    return [*keys, *ATTACK]


__all__ = ["DIFFERENCES", "LAYOUT_METHOD", "SETTINGS", "overrides", "settings"]

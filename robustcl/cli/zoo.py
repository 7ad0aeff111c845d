"""`robustcl zoo`: the catalogue of published robust-SSL checkpoints; `robustcl zoo NAME [--fetch]`."""
from __future__ import annotations

import argparse


def percent(value: float | None) -> str:
    """A percentage to two decimals ("n/a" for None: a number its source does not give, or one not measured)."""
    return "n/a" if value is None else f"{value:.2f}"


def published_line(entry: dict) -> str:
    """The SLF clean / AutoAttack numbers of an entry, per publisher ("-" where none is given)."""
    parts = []
    for who, numbers in (entry.get("published") or {}).items():
        slf = (numbers or {}).get("slf") or {}
        if slf:
            parts.append(f"{who} {percent(slf.get('clean'))}/{percent(slf.get('autoattack'))}")
    return "; ".join(parts) or "-"


def comparison_table(comparison: dict) -> str:
    """`robustcl evaluate --compare`'s table: our reading beside the catalogue's published one, per protocol: values,
    difference, our 95% intervals (CA: n/a, with the reason below the table, unless this evaluation read the
    published -C set's 15 corruptions at severities 1-5)."""
    def span(interval: list[float] | None) -> str:
        return "" if interval is None else f"{percent(interval[0])}-{percent(interval[1])}"

    lines = [f"compared with the catalogue's {comparison['entry']} (published numbers under their own protocol):",
             "| protocol | reading | clean (%) | robust (%) | corrupted, CA (%) | attack | clean 95% | robust 95% | CA 95% |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in comparison["rows"]:
        ours, theirs, diff, ci = row["ours"], row["published"], row["difference"], row["intervals_95"]
        name = row["protocol"].upper()
        lines += [f"| {name} | {row['label']} | {percent(ours['clean'])} | {percent(ours['robust'])} | "
                  f"{percent(ours.get('corruptions'))} | {row['attack']} | {span(ci['clean'])} | {span(ci['robust'])} | "
                  f"{span(ci.get('corruptions'))} |",
                  f"| {name} | published by {row['published_by']} | {percent(theirs['clean'])} | {percent(theirs['robust'])} | "
                  f"{percent(theirs.get('corruptions'))} | autoattack | | | |",
                  f"| {name} | ours - published | {percent(diff['clean'])} | {percent(diff['robust'])} | "
                  f"{percent(diff.get('corruptions'))} | | | | |"]
    sources = dict.fromkeys(row["published_source"] for row in comparison["rows"])
    notes = dict.fromkeys(row["corruptions_not_compared"] for row in comparison["rows"]
                          if row.get("corruptions_not_compared"))
    return "\n".join([*lines, *(f"source: {s}" for s in sources), *notes])


def cmd_zoo(args: argparse.Namespace) -> int:
    from robustcl import api

    known = api.zoo_catalogue()
    if args.name is None:
        print("| name | method | dataset | arch | layout | SLF clean/AutoAttack (%) | file source |")
        print("|---|---|---|---|---|---|---|")
        for name, e in known["entries"].items():
            print(f"| {name} | {e['method']} | {e['dataset']} | {e['arch']} | {e['layout']} | {published_line(e)} | "
                  f"{e['url_source']} |")
        print("\n".join(["", "sources:", *(f"  {k}: {v}" for k, v in known["sources"].items()),
                         "evaluate one: robustcl evaluate --encoder zoo:NAME --data DATASET [--compare]"]))
        return 0
    from robustcl.encoders import zoo

    entry = zoo.entry(args.name, known)
    for key in ("method", "dataset", "arch", "layout", "layout_checked", "file", "url", "url_source", "sha256"):
        print(f"{key}: {entry.get(key)}")
    for who, numbers in (entry.get("published") or {}).items():
        if not numbers:
            print(f"published by {who}: not verified (no number is given)")
            continue
        protocols = [p for p in ("slf", "alf", "aff") if p in numbers]
        keys = ["clean", "autoattack"] + (["corruptions"] if all("corruptions" in numbers[p] for p in protocols) else [])
        cells = ", ".join(f"{p.upper()} " + "/".join(percent(numbers[p][k]) for k in keys) for p in protocols)
        header = "clean/AutoAttack/corrupted (CA)" if "corruptions" in keys else "clean/AutoAttack"
        print(f"published by {who} ({header} %): {cells}; source: {known['sources'][numbers['source']]}")
    if args.fetch:
        print(f"file: {api.zoo_fetch(args.name)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="the catalogue of published robust-SSL checkpoints (method, dataset, layout, "
                                   "source, published clean/AutoAttack/corruption numbers)")
    p.add_argument("name", nargs="?", help="one entry in full (default: the whole catalogue)")
    p.add_argument("--fetch", action="store_true", help="download the entry's file into the cache ($ROBUSTCL_ZOO, "
                                                        "default ~/.cache/robustcl/zoo)")
    p.set_defaults(fn=cmd_zoo)

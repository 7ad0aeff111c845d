"""`robustcl zoo`: the catalogue of published robust-SSL checkpoints (robustcl/presets/zoo/catalogue.yaml) and
`--encoder zoo:NAME`: the file fetched into the cache (atomic, resumed with HTTP Range, checked against its
sha256 where one is known), or a one-line error naming the file to download by hand."""
from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from robustcl.config import parse_yaml
from robustcl.data.files import cache_root, fetch_file, file_digest, user_path
from robustcl.encoders.errors import EncoderError
from robustcl.stats import wilson_interval

CATALOGUE = ("robustcl.presets", "zoo/catalogue.yaml")
CACHE_ENV = "ROBUSTCL_ZOO"
PREFIX = "zoo:"
TIMEOUT_S = 60.0
# Share links that answer a script with a web page (a browser, a login or a confirmation step) instead of the file.
BROWSER_HOSTS = ("drive.google.com", "docs.google.com", "dropbox.com", "onedrive.live.com", "1drv.ms",
                 "sharepoint.com")


def catalogue() -> dict[str, Any]:
    """The shipped catalogue: {"sources": {id: citation}, "entries": {name: entry}}."""
    package, name = CATALOGUE
    text = resources.files(package).joinpath(name).read_text()
    data = parse_yaml(text, name)
    return {"sources": dict(data.get("sources") or {}), "entries": dict(data.get("entries") or {})}


def entry(name: str, known: Mapping[str, Any] | None = None) -> dict[str, Any]:
    entries = (known if known is not None else catalogue())["entries"]
    if name not in entries:
        raise EncoderError(f"zoo:{name} is not in the catalogue; `robustcl zoo` lists: {', '.join(entries)}")
    return {"name": name, **entries[name]}


def by_sha256(digest: str, known: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """The catalogue entry whose file has this sha256 (None: no entry, or no checksum is published)."""
    entries = (known if known is not None else catalogue())["entries"]
    return next(({"name": n, **e} for n, e in entries.items() if e.get("sha256") == digest), None)


def cache() -> Path:
    """Where zoo files are kept: `$ROBUSTCL_ZOO` if set, else the user cache's zoo/ folder."""
    env = os.environ.get(CACHE_ENV, "")
    return user_path(env, f"${CACHE_ENV}") if env else cache_root() / "zoo"


def by_hand(item: Mapping[str, Any], dest: Path, why: str) -> EncoderError:
    return EncoderError(f"zoo:{item['name']}: {why}; download {item['file']} by hand from {item['url']} and save it "
                        f"as {dest} (or pass --encoder PATH)")


def check(item: Mapping[str, Any], path: Path) -> Path:
    """`path` when its sha256 is the catalogue's (or none is known); else an error (the file is left in place)."""
    want = item.get("sha256")
    if want and file_digest(path, "sha256") != want:
        raise EncoderError(f"zoo:{item['name']}: {path} does not have the published sha256 {want[:16]}...; delete it "
                           "and run again (a damaged or different file)")
    return path


def fetch(name: str, folder: Path | None = None, known: Mapping[str, Any] | None = None,
          timeout: float = TIMEOUT_S) -> Path:
    """The catalogue file `name` in the cache: kept if there (checked), else downloaded."""
    item = entry(name, known)
    dest = (folder or cache()) / item["file"]
    if dest.is_file():
        return check(item, dest)
    host = (urlparse(item["url"]).hostname or "").lower()
    if any(host == h or host.endswith("." + h) for h in BROWSER_HOSTS):
        raise by_hand(item, dest, f"{host} serves this file through a browser page")
    return fetch_file(item["url"], dest, lambda part: check(item, part),
                      lambda reason: by_hand(item, dest, f"could not download it: {reason}"), timeout)


def resolve(source: Any) -> tuple[Any, dict[str, Any] | None]:
    """--encoder's order: an existing path as it is, then zoo:NAME (its file, fetched into the cache, and its
    catalogue entry), else `source` unchanged (a module or module:callable); (what to load, the entry or None)."""
    if isinstance(source, (str, Path)) and not Path(source).exists() and str(source).startswith(PREFIX):
        known = catalogue()
        name = str(source)[len(PREFIX):]
        item = entry(name, known)
        return fetch(name, known=known), item
    return source, None


def comparison(results: Mapping[str, Any], item: Mapping[str, Any], sources: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Our reading (clean, AutoAttack or else PGD, and the common-corruption accuracy CA when this evaluation
    read the published -C set's 15 corruptions x 5 severities, each with its 95% interval over the test images)
    beside each published one of `item`, per protocol, each labelled with its protocol and source."""
    ours_label = "ours (robustcl's protocol)" if results.get("encoder", {}).get("protocol_of") != "benchmark" \
        else "ours (the RobustSSL benchmark's reading)"
    rows = []
    n = int(results.get("n_eval", 0))
    for protocol, record in results.get("protocols", {}).items():
        attack = "autoattack" if "autoattack" in record["robust"] else next(iter(record["robust"]))
        ours = {"clean": 100 * record["clean_acc"], "robust": 100 * record["robust"][attack], "corruptions": None}
        intervals = {k: [100 * v for v in wilson_interval(ours[k] / 100 * n, n)] for k in ("clean", "robust")}
        corrupted, not_compared = record.get("corruptions"), None
        if corrupted and not corrupted.get("standard"):
            not_compared = "CA n/a: not the 15 corruptions at severities 1-5 (--corruptions all)"
        elif corrupted and not str(corrupted.get("source", "")).startswith("official"):
            not_compared = ("CA n/a: corruptions generated by robustcl, not the published -C set the catalogue's "
                            "CA was read on (put CIFAR-10-C / CIFAR-100-C under data.root or the cache)")
        elif corrupted:
            ours["corruptions"] = 100 * corrupted["mean"]
            # a per-image mean over the cells varies at most as one Bernoulli draw per image: Wilson on n images
            intervals["corruptions"] = [100 * v for v in wilson_interval(corrupted["mean"] * corrupted["n"], corrupted["n"])]
        for who, published in (item.get("published") or {}).items():
            if not published:
                continue
            numbers = published.get(protocol) or {}
            theirs = {"clean": numbers.get("clean"), "robust": numbers.get("autoattack"),
                      "corruptions": numbers.get("corruptions")}
            rows.append({"protocol": protocol, "label": ours_label, "attack": attack, "ours": ours,
                         "intervals_95": intervals, "n_eval": n, "published_by": who,
                         "published_source": sources.get(published.get("source"), published.get("source")),
                         "published": theirs, "corruptions_not_compared": not_compared,
                         "difference": {k: None if theirs[k] is None or ours[k] is None else ours[k] - theirs[k]
                                        for k in ours}})
    return rows


__all__ = ["BROWSER_HOSTS", "CACHE_ENV", "PREFIX", "by_sha256", "cache", "catalogue", "check", "comparison", "entry",
           "fetch", "resolve"]

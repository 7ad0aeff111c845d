"""`robustcl zoo` and --encoder zoo:NAME: the shipped catalogue (every number with its source), a download into
the cache from a loopback HTTP server (atomic, resumed with an HTTP Range request, sha256-checked), and one-line
errors naming the file to fetch by hand when offline or when the host needs a browser; --compare's table."""
from __future__ import annotations

import hashlib

import pytest
from range_server import PAYLOAD, Server

from robustcl.cli import main
from robustcl.encoders import EncoderError, zoo


def catalogue(url: str, sha: str | None) -> dict:
    return {"sources": {"here": "a test server"},
            "entries": {"enc": {"method": "ACL", "dataset": "cifar10", "arch": "resnet18", "layout": "acl",
                                "file": "enc.pt", "url": url, "url_source": "here", "sha256": sha,
                                "published": {"benchmark": {"source": "here", "slf": {"clean": 80.0, "autoattack": 40.0}},
                                              "authors": None}}}}


def test_the_shipped_catalogue_cites_a_source_for_every_number():
    known = zoo.catalogue()
    assert len(known["entries"]) >= 20
    for name, entry in known["entries"].items():
        assert entry["url_source"] in known["sources"], name
        assert entry["layout"] in ("acl", "advcl", "deacl", "lpaft"), name
        for who, numbers in entry["published"].items():
            if numbers is None:
                continue
            assert numbers["source"] in known["sources"], (name, who)
            for protocol in ("slf", "alf", "aff"):
                assert 0 < numbers[protocol]["autoattack"] < numbers[protocol]["clean"] < 100, (name, protocol)
                if who == "benchmark":  # the leaderboard's third number: corrupted below clean, above AutoAttack
                    ca = numbers[protocol]["corruptions"]
                    assert numbers[protocol]["autoattack"] < ca < numbers[protocol]["clean"], (name, protocol)
    acl = known["entries"]["acl-cifar10"]["published"]["benchmark"]
    assert acl["slf"] == {"clean": 78.22, "autoattack": 39.17, "corruptions": 70.72}


def test_a_download_is_resumed_with_a_range_request_and_checked(tmp_path):
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    server = Server(cut=1)
    with server as base:
        known = catalogue(f"{base}/enc.pt", sha)
        with pytest.raises(EncoderError, match="could not download it: .*kept in .*enc.pt.part and resumed next time.*save it as") as err:
            zoo.fetch("enc", tmp_path, known)
        assert "\n" not in str(err.value) and not (tmp_path / "enc.pt").exists()
        assert 0 < (tmp_path / "enc.pt.part").stat().st_size < len(PAYLOAD)
        path = zoo.fetch("enc", tmp_path, known)
    assert path == tmp_path / "enc.pt" and path.read_bytes() == PAYLOAD and not (tmp_path / "enc.pt.part").exists()
    assert zoo.fetch("enc", tmp_path, known) == path  # cached: no request
    assert server.requests == [None, f"bytes={len(PAYLOAD) // 2}-"]  # the second asked only for the rest


def test_a_wrong_checksum_is_an_error_and_nothing_is_kept(tmp_path):
    with Server() as base:
        with pytest.raises(EncoderError, match="does not have the published sha256"):
            zoo.fetch("enc", tmp_path, catalogue(f"{base}/enc.pt", "0" * 64))
    assert not (tmp_path / "enc.pt").exists() and not (tmp_path / "enc.pt.part").exists()


def test_offline_and_browser_hosts_name_the_file_to_download_by_hand(tmp_path):
    with Server() as base:
        pass  # the port is closed again: nothing listens there
    with pytest.raises(EncoderError, match=f"download enc.pt by hand from {base}/enc.pt and save it as {tmp_path}"):
        zoo.fetch("enc", tmp_path, catalogue(f"{base}/enc.pt", None))
    for url in ("https://www.dropbox.com/s/x/enc.pt?dl=0", "https://drive.google.com/file/d/x/view"):
        with pytest.raises(EncoderError, match="serves this file through a browser page; download enc.pt by hand"):
            zoo.fetch("enc", tmp_path, catalogue(url, None))


def test_zoo_lists_the_catalogue_and_an_unknown_name_is_one_line(capsys):
    assert main(["zoo"]) == 0
    out = capsys.readouterr().out
    assert "| acl-cifar10 | ACL | cifar10 | resnet18 | acl | benchmark 78.22/39.17 |" in out
    assert "benchmark-leaderboard:" in out
    assert main(["zoo", "deacl-cifar10-authors"]) == 0
    assert "published by authors (clean/AutoAttack %): SLF 80.82/46.14" in capsys.readouterr().out
    assert main(["zoo", "acl-cifar10"]) == 0
    assert "published by benchmark (clean/AutoAttack/corrupted (CA) %): SLF 78.22/39.17/70.72" in capsys.readouterr().out
    assert main(["zoo", "nope"]) == 2
    assert "zoo:nope is not in the catalogue" in capsys.readouterr().err


def test_the_comparison_rows_label_both_readings_and_give_our_intervals():
    results = {"n_eval": 1000, "encoder": {"protocol_of": "robustcl"},
               "protocols": {"slf": {"clean_acc": 0.8, "robust": {"pgd": 0.5, "autoattack": 0.42}}}}
    known = catalogue("http://127.0.0.1:1/enc.pt", None)
    rows = zoo.comparison(results, zoo.entry("enc", known), known["sources"])
    assert len(rows) == 1  # authors: null gives no row
    row = rows[0]
    assert row["label"] == "ours (robustcl's protocol)" and row["attack"] == "autoattack"
    assert row["published"] == {"clean": 80.0, "robust": 40.0, "corruptions": None}
    assert row["difference"]["robust"] == pytest.approx(2.0)
    lo, hi = row["intervals_95"]["robust"]
    assert lo < 42 < hi and hi - lo == pytest.approx(6.1, abs=0.2)  # Wilson, n = 1000
    assert row["ours"]["corruptions"] is None and row["difference"]["corruptions"] is None  # not evaluated


def test_the_comparison_gives_ca_only_for_the_published_sets_fifteen_corruptions_at_five_severities():
    known = catalogue("http://127.0.0.1:1/enc.pt", None)
    known["entries"]["enc"]["published"]["benchmark"]["slf"]["corruptions"] = 70.0
    record = {"clean_acc": 0.8, "robust": {"autoattack": 0.42},
              "corruptions": {"mean": 0.715, "n": 400, "standard": True, "source": "official CIFAR-10-C (/data)"}}
    results = {"n_eval": 1000, "protocols": {"slf": record}}
    row = zoo.comparison(results, zoo.entry("enc", known), known["sources"])[0]
    assert row["ours"]["corruptions"] == pytest.approx(71.5) and row["published"]["corruptions"] == 70.0
    assert row["difference"]["corruptions"] == pytest.approx(1.5)
    lo, hi = row["intervals_95"]["corruptions"]
    assert lo < 71.5 < hi and hi - lo == pytest.approx(8.8, abs=0.2)  # Wilson over the 400 images of one cell
    from robustcl.cli.zoo import comparison_table

    table = comparison_table({"entry": "enc", "rows": [row]})
    assert "| SLF | ours (robustcl's protocol) | 80.00 | 42.00 | 71.50 | autoattack |" in table
    assert "| SLF | published by benchmark | 80.00 | 40.00 | 70.00 | autoattack |" in table
    assert "| SLF | ours - published | 0.00 | 2.00 | 1.50 |" in table
    assert "CA n/a" not in table
    for change, why in (({"standard": False}, "not the 15 corruptions at severities 1-5"),  # a subset
                        ({"source": "generated by robustcl (make_cifar_c.py constants)"}, "corruptions generated")):
        record["corruptions"] = {"mean": 0.715, "n": 400, "standard": True, "source": "official", **change}
        row = zoo.comparison(results, zoo.entry("enc", known), known["sources"])[0]
        assert row["ours"]["corruptions"] is None and row["difference"]["corruptions"] is None
        table = comparison_table({"entry": "enc", "rows": [row]})
        assert "| SLF | ours - published | 0.00 | 2.00 | n/a |" in table and f"CA n/a: {why}" in table


def test_zoo_name_resolves_after_an_existing_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zoo:enc").write_bytes(b"")  # a file of that name wins
    assert zoo.resolve("zoo:enc") == ("zoo:enc", None)
    (tmp_path / "zoo:enc").unlink()
    monkeypatch.setattr(zoo, "catalogue", lambda: catalogue("https://www.dropbox.com/s/x/enc.pt", None))
    monkeypatch.setenv(zoo.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "enc.pt").write_bytes(b"x")  # already in the cache: no download
    path, item = zoo.resolve("zoo:enc")
    assert path == tmp_path / "cache" / "enc.pt" and item["name"] == "enc"


def test_a_number_its_source_does_not_give_is_printed_as_such(monkeypatch, capsys):
    """The catalogue allows null ("not found there, never estimated"): `robustcl zoo` prints n/a, not a traceback."""
    known = catalogue("http://127.0.0.1:1/enc.pt", None)
    known["entries"]["enc"]["published"]["benchmark"]["slf"]["autoattack"] = None
    monkeypatch.setattr(zoo, "catalogue", lambda: known)
    assert main(["zoo", "enc"]) == 0 and "SLF 80.00/n/a" in capsys.readouterr().out
    assert main(["zoo"]) == 0 and "| benchmark 80.00/n/a |" in capsys.readouterr().out

"""Fixtures shared by several test files."""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

# `precision: auto` resolves to fp32 in every test on every kind of CI machine (AVX2-only or AVX512-BF16),
# subprocesses included; tests of the resolution itself fake the capability (tests/test_hardware.py).
os.environ["ROBUSTCL_CPU_CAPABILITY"] = "AVX2"

import robustcl.methods  # noqa: E402, F401 - registers the methods the tests' configs need, as every entry point does


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single `robustcl: error:` line a command printed (no traceback, nothing else); tests import it from
    here (`from conftest import one_line_error`)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("robustcl: error: "), err
    return lines[0]


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path) -> Path:
    """A copy of the test module's `finished` run (a module-scoped fixture of that module), links kept as links."""
    dst = tmp_path / "run"
    shutil.copytree(finished, dst, symlinks=True)
    return dst


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Static file handler that does not log to stderr."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence request logs."""


@pytest.fixture
def data_http_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A loopback HTTP server over tmp_path/www (proxies off); yields (served dir, base URL)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def registry() -> Iterator[dict[str, Any]]:
    """robustcl.methods.METHODS, restored after the test: a method class a test defines is unregistered after it."""
    from robustcl.methods import METHODS

    saved = dict(METHODS)
    yield METHODS
    METHODS.clear()
    METHODS.update(saved)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (tiny tensors: faster, and steady when other processes share the cores)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def pretrain_recording(cls: type, record: Callable[[Any, Any], Any], cfg: Any, root: Path,
                       monkeypatch: pytest.MonkeyPatch, die_at: int | None = None) -> list[Any]:
    """Pretrain `cfg` in `root` with `cls.training_step` wrapped to append record(method, ctx) after each step;
    with `die_at`, that call raises KeyboardInterrupt and the run is resumed. Returns the records in order."""
    from robustcl.runs import RunDir
    from robustcl.train.pretrain import pretrain

    real = getattr(cls.training_step, "unwrapped", cls.training_step)  # a second call in one test: the real step
    seen, calls = [], {"n": 0}

    def recording(self, images, ctx):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        out = real(self, images, ctx)
        seen.append(record(self, ctx))
        return out

    recording.unwrapped = real  # type: ignore[attr-defined]
    monkeypatch.setattr(cls, "training_step", recording)
    run = RunDir(root)
    if die_at is not None:
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, run, progress=False)
        pretrain(cfg, run, resume=True, progress=False)
    else:
        pretrain(cfg, run, progress=False)
    return seen

"""Fixtures shared by several test files."""
from __future__ import annotations

import functools
import http.server
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

# `precision: auto` resolves to fp32 in every test on every kind of CI machine (AVX2-only or AVX512-BF16),
# subprocesses included; tests of the resolution itself fake the capability (tests/test_hardware.py).
os.environ["ROBUSTCL_CPU_CAPABILITY"] = "AVX2"


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

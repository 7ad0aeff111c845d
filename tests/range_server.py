"""A loopback HTTP server with Range support that can drop a connection mid-file: downloads resumed and checked."""
from __future__ import annotations

import http.server
import threading
import time

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server:
    """http.server on 127.0.0.1 in a thread, serving `files` ({"/name": bytes}, default PAYLOAD at /enc.pt) with
    Range support; the first `cut` answers stop after half the bytes (a connection dropped mid-file); each answer
    waits `delay` seconds before its body (a slow link); a resumed request whose If-Range is not `etag` gets the
    whole file."""

    def __init__(self, cut: int = 0, files: dict[str, bytes] | None = None, delay: float = 0.0) -> None:
        self.cut, self.requests, self.delay = cut, [], delay
        self.etag = '"v1"'  # set another to say the files changed
        self.files = files if files is not None else {"/enc.pt": PAYLOAD}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append(self.headers.get("Range"))
                if self.path not in outer.files:
                    self.send_error(404)
                    return
                whole = outer.files[self.path]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                if self.headers.get("If-Range", outer.etag) != outer.etag:
                    start = 0  # the file changed since the part was fetched: all of it again
                body = whole[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(whole) - 1}/{len(whole)}")
                self.send_header("ETag", outer.etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                time.sleep(outer.delay)
                if outer.cut > 0:
                    outer.cut -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

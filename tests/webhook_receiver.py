"""A tiny threaded HTTP receiver on 127.0.0.1 for webhook tests: records requests, answers scripted codes."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Collects POSTs; answers the codes in ``script`` in turn, then 200."""

    def __init__(self, script: list[int] | None = None):
        self.requests: list[dict] = []
        self.script = list(script or [])
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    code = receiver.script.pop(0) if receiver.script else 200
                    receiver.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                              "body": body, "answered": code})
                self.send_response(code)
                self.send_header("content-type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok" if code == 200 else b"nope")

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks/kiln"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 120) -> list[dict]:
        """Block until ``count`` requests arrived (generous timeout: a loaded 2-core machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            time.sleep(0.1)
        raise AssertionError(f"receiver got {len(self.requests)} requests, expected {count}")

    def close(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

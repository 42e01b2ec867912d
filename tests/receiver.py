"""A loopback HTTPS-less endpoint for the fake Stripe's deliveries (webhooks, event
destinations): it records each request and answers scripted statuses."""

import http.server
import threading
from collections import deque
from typing import Any


class Receiver:
    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.statuses: deque[int] = deque()  # answered in order; 200 once empty
        self._lock = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests.append((body, dict(self.headers)))
                    status = receiver.statuses.popleft() if receiver.statuses else 200
                    receiver._lock.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.path}"

    def wait_for(self, count: int, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: len(self.requests) >= count, timeout)

    def received(self) -> list[tuple[bytes, dict[str, str]]]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

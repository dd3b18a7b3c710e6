"""An HTTP proxy on loopback in front of a cloud fake: forwards each request, or answers one with an error."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target_port``; :meth:`fail` makes chosen requests answer an S3 error
    (503 ServiceUnavailable unless it says)."""

    def __init__(self, target_port: int) -> None:
        # [method, requests to let pass first, failures left, forwarded first, (status, code)]
        self._rules: list[list] = []
        self._lock = threading.Lock()
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                failing = proxy._failing(self.command)
                if failing is not None:
                    forwarded, (status, code) = failing
                    if forwarded:  # done upstream, its answer lost on the way back
                        self._forwarded(body)
                    data = b"" if self.command == "HEAD" else f"<Error><Code>{code}</Code></Error>".encode()
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                answer, data = self._forwarded(body)
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _forwarded(self, body: bytes) -> tuple[http.client.HTTPResponse, bytes]:
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                upstream.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                answer = upstream.getresponse()
                data = answer.read()
                upstream.close()
                return answer, data

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
        self.port = self._server.server_port
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def fail(
        self,
        method: str,
        *,
        after: int = 0,
        times: int = 1,
        forwarded: bool = False,
        status: int = 503,
        code: str = "ServiceUnavailable",
    ) -> None:
        """Answer ``status`` and ``code`` to ``times`` requests of ``method``, once ``after`` of them went
        through; with ``forwarded``, each is done upstream first (its answer lost on the way back)."""
        with self._lock:
            self._rules.append([method, after, times, forwarded, (status, code)])

    def _failing(self, method: str) -> tuple[bool, tuple[int, str]] | None:
        """``None``: forward the request; else (whether to forward it first, the error to answer)."""
        with self._lock:
            for rule in self._rules:
                if rule[0] == method and rule[2] > 0:
                    if rule[1] > 0:
                        rule[1] -= 1
                        return None
                    rule[2] -= 1
                    return bool(rule[3]), rule[4]
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

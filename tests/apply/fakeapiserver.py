"""An HTTP server that answers where a Kubernetes API server should, with whatever a
test scripts: a proxy's HTML page, a truncated body, an endless stream, a continue
token that never ends. The real API server cannot be made to misbehave like that."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from loopback import LoopbackServer

from reconciler.apply.kubeclient import KubeClient, RetryPolicy


@dataclass
class Reply:
    """One answer: a status, headers and a body (bytes, or chunks written one by one
    with ``Transfer-Encoding: chunked`` when ``chunks`` is set)."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    chunks: Callable[[], Iterable[bytes]] | None = None


# Chooses the reply for (method, path with query, index of this request).
Script = Callable[[str, str, int], Reply]


class FakeApiServer(LoopbackServer):
    """A threaded loopback server answering every method with ``script``; ``requests``
    records (method, path with query) in order, ``sent_bytes`` the body bytes written."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[tuple[str, str]] = []
        self.sent_bytes = 0
        self.lock = threading.Lock()
        super().__init__(_Handler)

    def client(self, **kwargs: Any) -> KubeClient:
        """A client of this server that retries at once (no backoff sleeps)."""
        kwargs.setdefault("retry", RetryPolicy(attempts=2, base_delay_s=0.0, max_delay_s=0.0))
        return KubeClient(self.url, **kwargs)

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose current context is this server (a bearer token)."""
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f'clusters: [{{name: fake, cluster: {{server: "{self.url}"}}}}]\n'
            "users: [{name: u, user: {token: t}}]\n"
            "contexts: [{name: fake, context: {cluster: fake, user: u}}]\n"
            "current-context: fake\n"
        )
        return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        server: FakeApiServer = self.server.owner  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        with server.lock:
            index = len(server.requests)
            server.requests.append((self.command, self.path))
        reply = server.script(self.command, self.path, index)
        self.send_response(reply.status)
        headers = {"Content-Type": "application/json", **reply.headers}
        if reply.chunks is None:
            headers.setdefault("Content-Length", str(len(reply.body)))
        else:
            headers["Transfer-Encoding"] = "chunked"
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            if reply.chunks is None:
                self.wfile.write(reply.body)
                self._count(server, len(reply.body))
                return
            for chunk in reply.chunks():
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
                self._count(server, len(chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    @staticmethod
    def _count(server: FakeApiServer, sent: int) -> None:
        with server.lock:
            server.sent_bytes += sent

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def always(reply: Reply) -> Script:
    return lambda _method, _path, _index: reply


def in_turn(*replies: Reply) -> Script:
    """The replies in order, the last one repeated."""
    return lambda _method, _path, index: replies[min(index, len(replies) - 1)]


def endless(chunk: bytes) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        while True:
            yield chunk

    return chunks

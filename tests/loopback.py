"""A threaded loopback HTTP server around a handler class: the base of every scripted
server the tests start in place of a real one (Prometheus, a Kubernetes API server,
engines' exporters). One module beside conftest.py, so tests of any directory import
it."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class LoopbackServer:
    """Serves ``handler`` on 127.0.0.1 at a free port from a daemon thread; ``url``
    while running. A handler reaches this object as ``self.server.owner``."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unreachable_kubeconfig(path: Path, context: str = "c") -> Path:
    """Write at ``path`` a kubeconfig whose one context, ``context`` (the current one),
    points at a loopback port nothing listens on (port 1): a cluster that is down."""
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        'clusters: [{name: c, cluster: {server: "https://127.0.0.1:1"}}]\n'
        "users: [{name: u, user: {token: t}}]\n"
        f"contexts: [{{name: {context}, context: {{cluster: c, user: u}}}}]\n"
        f"current-context: {context}\n"
    )
    return path

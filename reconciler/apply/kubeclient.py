"""A small JSON client for the Kubernetes API: the only place that talks HTTP to it.

Why not the generated client's typed models: at 2,500 Nodes and hundreds of
Deployments, deserialising into model objects costs seconds per cycle, while plain
JSON costs tens of milliseconds; and server-side apply, ``dryRun=All`` and the raw
409 details are easier to reach as plain requests. Authentication comes from the
official client's kubeconfig / in-cluster loaders, so every kubeconfig it
understands (tokens, client certificates, exec plugins) works here too.

Retry semantics live in the error types (``reconciler.errors``):
- connection errors, 429 and 5xx are retried here with exponential backoff (and
  ``Retry-After``), then raised as ``ClusterUnavailable`` (temporary);
- 409 from optimistic concurrency is ``ResourceConflict`` (temporary: re-read and
  retry, which the applier does); 409 from server-side apply field ownership is
  ``FieldOwnershipConflict`` (someone else changed fields we own: drift, not
  retried unless forced);
- 404 is ``NotFound``; 403 ``Forbidden``; other 4xx ``ApiRejected`` (permanent).

Answers are untrusted input (a proxy or a broken aggregated API may answer instead):
bounded in size and time (``bounded_read.read_answer``), checked in shape (a 2xx body
is a JSON object, a list page a list of objects, a watch line a known event), lists
and watches bounded in length; anything else is ``ClusterUnavailable``, never a
decoding traceback. Quoted text is escaped and cut (``text_safety.quoted``).
"""

from __future__ import annotations

import builtins
import json
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import urllib3

from reconciler.bounded_read import BoundedReadError, DeadlinePassed, read_answer
from reconciler.desired.checks import MAX_FLEET_NODES
from reconciler.dns1123 import name_segment, namespace_segment
from reconciler.errors import ApplyConflict, ClusterUnavailable, HeteroscaleError, PermanentError
from reconciler.text_safety import QUOTED_CHARS, cut, quoted

JsonObject = dict[str, Any]
# A Status reason is one CamelCase word ("Conflict", "NotFound"); anything longer is
# not the API server's.
_REASON_CHARS = 60
APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class KubeApiError(HeteroscaleError):
    """An answer other than 2xx from the API server. ``reason`` and ``api_message`` are
    the answer's, escaped and cut (``text_safety.quoted``): they reach log lines,
    reports and ``status``, and whatever answers at the address wrote them."""

    def __init__(self, status: int, reason: str, message: str, body: JsonObject | None = None):
        self.status = status
        self.reason = quoted(reason, _REASON_CHARS)
        self.api_message = quoted(message)
        self.body = body or {}
        super().__init__(f"HTTP {status} {self.reason}: {self.api_message}")


class NotFound(KubeApiError):
    pass


class Forbidden(KubeApiError, PermanentError):
    pass


class ApiRejected(KubeApiError, PermanentError):
    """The request was invalid (400, 422, ...); retrying the same request will not help."""


class ResourceConflict(KubeApiError, ApplyConflict):
    """409: the object changed since we read it. Re-read and retry."""


class FieldOwnershipConflict(KubeApiError, PermanentError):
    """409 from server-side apply: another field manager owns fields we set, with other
    values. Reported as drift; ``--force`` takes the fields back."""

    @property
    def conflicts(self) -> list[str]:
        return [
            f"{quoted(str(c.get('field', '?')))}: {quoted(str(c.get('message', '')))}"
            for c in status_causes(self.body)
        ]


def status_causes(body: JsonObject) -> builtins.list[JsonObject]:
    """The ``details.causes`` of a Status answer: those that are objects, in an answer
    of any shape (a proxy's or a broken server's may hold anything there)."""
    details = body.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    if not isinstance(causes, builtins.list):
        return []
    return [c for c in causes if isinstance(c, dict)]


# The largest answer body read (decoded: gzip is inflated within the bound). A list
# page holds 1000 objects; a GPU Node can reach ~100 KB (50 images in its status,
# node-feature-discovery labels and their managed fields), a Pod ~20 KB, and etcd
# refuses a single object above 1.5 MiB by default. A larger answer makes the
# cluster unavailable for the cycle (its services hold).
MAX_ANSWER_BYTES = 128 * 1024 * 1024
_READ_CHUNK_BYTES = 64 * 1024
# The most items one list may hold: ten times the Nodes of the largest fleet the
# project supports (MAX_FLEET_NODES), so every Node of it or a Pod per GPU (eight a
# node) fits with room; a server answering more is not telling the truth.
MAX_LIST_ITEMS = 10 * MAX_FLEET_NODES
# The most pages one list may take: the API server fills every page but the last, so
# the largest list takes MAX_LIST_ITEMS / 1000 pages at the default size; a server
# returning short pages with fresh continue tokens for ever ends here.
MAX_LIST_PAGES = 10_000
# The longest one list may take, all its pages: ten cycles at the default 30 s
# interval. Each request is bounded on its own, but a server answering short pages
# just within the timeouts (fresh continue tokens each time) held one cluster's read,
# and every cluster reconciled after it, for days within the page bound.
MAX_LIST_S = 300.0
_MISSING = object()
WATCH_EVENT_TYPES = frozenset({"ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"})
# How long past its timeoutSeconds a watch is read before it is left.
WATCH_GRACE_S = 30.0


class _Retryable(Exception):
    """A request that may succeed if sent again (a transport error, a slow answer)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    base_delay_s: float = 0.2
    max_delay_s: float = 2.0

    def delay_s(self, attempt: int, retry_after_s: float | None = None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_delay_s)
        backoff: float = self.base_delay_s * (2**attempt)
        return min(self.max_delay_s, backoff) * (0.5 + random.random() / 2)


@dataclass
class RequestStats:
    """Requests and retries of one client. One client serves several threads at once
    (the snapshot's concurrent lists, the server-side dry runs' pool), and ``+=`` on
    an attribute is a read and a write that two threads can interleave: counts go
    through the lock."""

    requests: int = 0
    retries: int = 0
    by_verb: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count_request(self, method: str) -> None:
        with self._lock:
            self.requests += 1
            self.by_verb[method] = self.by_verb.get(method, 0) + 1

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1


# Called before every HTTP request with (method, path?query): a seam for metrics, tracing,
# and for tests that need to act at an exact point of a sequence of requests.
RequestHook = Callable[[str, str], None]


class KubeClient:
    """JSON over HTTPS to one API server. Thread-safe (urllib3 pools are)."""

    def __init__(
        self,
        server: str,
        *,
        ca_file: str | None = None,
        verify_tls: bool = True,
        cert_file: str | None = None,
        key_file: str | None = None,
        auth_header: Callable[[], str | None] = lambda: None,
        timeout_s: tuple[float, float] = (3.0, 30.0),
        retry: RetryPolicy | None = None,
        pool_size: int = 8,
        name: str = "",
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        max_list_items: int = MAX_LIST_ITEMS,
        max_list_pages: int = MAX_LIST_PAGES,
        max_list_s: float = MAX_LIST_S,
    ):
        self.server = server.rstrip("/")
        self.name = name or self.server
        self._auth_header = auth_header
        self._timeout = urllib3.Timeout(connect=timeout_s[0], read=timeout_s[1])
        self.max_answer_bytes = max_answer_bytes
        self.max_list_items = max_list_items
        self.max_list_pages = max_list_pages
        self.max_list_s = max_list_s
        # The whole body of one answer within twice the read timeout: the read
        # timeout alone bounds each read, not a server trickling a byte at a time.
        self.answer_deadline_s = 2 * timeout_s[1]
        self.retry = retry or RetryPolicy()
        self.stats = RequestStats()
        self.hooks: list[RequestHook] = []
        pool_args: dict[str, Any] = {"maxsize": pool_size, "block": False, "retries": False}
        if self.server.startswith("https"):
            pool_args["cert_reqs"] = "CERT_REQUIRED" if verify_tls else "CERT_NONE"
            if ca_file:
                pool_args["ca_certs"] = ca_file
            if cert_file:
                pool_args["cert_file"] = cert_file
                pool_args["key_file"] = key_file
        self._pool = urllib3.PoolManager(**pool_args)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_kubeconfig(
        cls, path: str | None = None, context: str | None = None, **kwargs: Any
    ) -> KubeClient:
        """A client for ``context`` of the kubeconfig at ``path`` (None: $KUBECONFIG or
        ~/.kube/config). Raises ``ClusterUnavailable`` when it cannot be loaded."""
        from kubernetes import config as kube_config
        from kubernetes.client import Configuration

        cfg = Configuration()
        try:
            kube_config.load_kube_config(
                config_file=path, context=context, client_configuration=cfg
            )
        except Exception as exc:  # the loader raises ConfigException, ValueError, OSError...
            where = f"context '{context}'" if context else "the current context"
            raise ClusterUnavailable(
                f"cannot load {where} from kubeconfig {path or '(default)'}: {exc}"
            ) from exc
        name = f"{cfg.host} (context '{context}')" if context else cfg.host
        return cls._from_configuration(cfg, name=kwargs.pop("name", name), **kwargs)

    @classmethod
    def in_cluster(cls, **kwargs: Any) -> KubeClient:
        from kubernetes import config as kube_config
        from kubernetes.client import Configuration

        cfg = Configuration()
        kube_config.load_incluster_config(client_configuration=cfg)
        return cls._from_configuration(cfg, name=kwargs.pop("name", "in-cluster"), **kwargs)

    @classmethod
    def _from_configuration(cls, cfg: Any, **kwargs: Any) -> KubeClient:
        def auth_header() -> str | None:
            setting = cfg.auth_settings().get("BearerToken")
            return setting["value"] if setting else None

        return cls(
            cfg.host,
            ca_file=cfg.ssl_ca_cert,
            verify_tls=bool(cfg.verify_ssl),
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            auth_header=auth_header,
            **kwargs,
        )

    def with_token(self, token: str, name: str = "") -> KubeClient:
        """The same server and TLS settings, authenticated by a bearer token."""
        clone = KubeClient.__new__(KubeClient)
        clone.__dict__.update(self.__dict__)
        clone._auth_header = lambda: f"Bearer {token}"
        clone.stats = RequestStats()
        clone.hooks = []
        clone.name = name or self.name
        return clone

    # ---------------------------------------------------------------------- requests

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int | bool] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> JsonObject:
        """One API call; returns the decoded JSON body. Retries transport errors, 429
        and 5xx with backoff; raises typed errors for everything else."""
        target = path
        if query:
            target += "?" + urlencode(
                {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()}
            )
        url = self.server + target
        # gzip: list responses are large and highly repetitive (~40x smaller), and the
        # API server compresses them; TLS over even loopback is the slow part otherwise.
        headers = {"Accept": "application/json", "Accept-Encoding": "gzip"}
        auth = self._auth_header()
        if auth:
            headers["Authorization"] = auth
        payload: bytes | None = None
        if body is not None:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        last_error = ""
        for attempt in range(self.retry.attempts):
            for hook in self.hooks:
                hook(method, target)
            self.stats.count_request(method)
            retry_after: float | None = None
            try:
                status, data, answer_headers = self._exchange(method, url, payload, headers)
            except _Retryable as exc:
                last_error = str(exc)
            except BoundedReadError as exc:  # asking again would only read as much again
                raise ClusterUnavailable(
                    f"API server {self.name} answered {method} {path} with a body that "
                    f"{exc.reason} (max_answer_bytes)"
                ) from None
            else:
                if 200 <= status < 300:
                    return self._answer_object(method, path, status, data)
                if 300 <= status < 400:
                    # Redirects are not followed (the pool has retries off): an answer
                    # from elsewhere is not the API server's, and our token must not go
                    # there. Not the server refusing a request either: it is unavailable.
                    location = quoted(str(answer_headers.get("Location", "")))
                    raise ClusterUnavailable(
                        f"API server {self.name} answered {method} {path} with HTTP {status}, "
                        f"a redirect to '{location}', not followed"
                    )
                decoded = _decode(data)
                if status == 429 or status >= 500:
                    last_error = f"HTTP {status}: {quoted(str(decoded.get('message', '')))}"
                    retry_after = _retry_after_s(answer_headers.get("Retry-After"))
                else:
                    raise _error(status, decoded)
            if attempt + 1 < self.retry.attempts:
                self.stats.count_retry()
                time.sleep(self.retry.delay_s(attempt, retry_after))
        raise ClusterUnavailable(
            f"API server {self.name} did not answer {method} {path} after "
            f"{self.retry.attempts} attempts: {last_error}"
        )

    def _answer_object(self, method: str, path: str, status: int, data: bytes) -> JsonObject:
        """A 2xx answer's body: every API answer we ask for is a JSON object. Anything
        else (a proxy's HTML page, a truncated body, a list, nothing) is not the API
        server's: ``ClusterUnavailable``, not retried (a write may have happened; the
        next cycle reads what did)."""
        try:
            decoded = json.loads(data)
        except ValueError:
            what = f"not JSON ({quoted(data[:QUOTED_CHARS].decode(errors='replace'))})"
        else:
            if isinstance(decoded, dict):
                return decoded
            what = f"JSON {type(decoded).__name__}, not an object"
        raise ClusterUnavailable(
            f"API server {self.name} answered {method} {path} with HTTP {status} whose "
            f"body is {what if data else 'empty'}"
        )

    def _exchange(
        self, method: str, url: str, payload: bytes | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """One HTTP request: the status, the whole body (bounded: ``read_answer``) and
        the headers. ``_Retryable`` for a transport error or an answer not
        in full by its deadline; ``BoundedReadError`` for one past ``max_answer_bytes``."""
        deadline = time.monotonic() + self.answer_deadline_s
        try:
            response = self._pool.request(
                method,
                url,
                body=payload,
                headers=headers,
                timeout=self._timeout,
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise _Retryable(f"{type(exc).__name__}: {quoted(str(exc))}") from None
        complete = False
        try:
            data = self._read_body(response, deadline)
            complete = True
        except DeadlinePassed:
            raise _Retryable(
                f"the answer did not arrive in full within {self.answer_deadline_s:g} s"
            ) from None
        except urllib3.exceptions.HTTPError as exc:  # a read timeout, a cut or corrupt body
            raise _Retryable(f"{type(exc).__name__}: {quoted(str(exc))}") from None
        finally:
            if not complete:
                response.close()  # the rest is unread: the connection cannot be reused
            response.release_conn()
        return response.status, data, response.headers

    def _read_body(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytes:
        """A response's whole body within ``max_answer_bytes`` and ``deadline``: one
        bounded read for a request's answer and a refused watch's error alike."""
        return read_answer(
            # read1: what has arrived (decoded, at most a chunk), so the deadline
            # is checked between a trickling server's bytes.
            lambda: response.read1(_READ_CHUNK_BYTES, decode_content=True),
            declared_bytes=response.headers.get("Content-Length"),
            max_bytes=self.max_answer_bytes,
            deadline=deadline,
        )

    def get(self, path: str, **query: str | int | bool) -> JsonObject:
        return self.request("GET", path, query=query or None)

    def list(
        self, path: str, *, label_selector: str | None = None, page_size: int = 1000
    ) -> Iterator[JsonObject]:
        """Every item of a collection, following ``continue`` tokens (``_pages``)."""
        for items, _version in self._pages(path, label_selector, page_size):
            yield from items

    def list_with_version(
        self, path: str, *, label_selector: str | None = None, page_size: int = 1000
    ) -> tuple[builtins.list[JsonObject], str]:
        """Every item of a collection and the collection's resourceVersion (where a
        watch resumes from)."""
        items: builtins.list[JsonObject] = []
        version = ""
        for page, page_version in self._pages(path, label_selector, page_size):
            items.extend(page)
            version = page_version  # the last page's: where the list ends
        return items, version

    def _pages(
        self, path: str, label_selector: str | None, page_size: int
    ) -> Iterator[tuple[builtins.list[JsonObject], str]]:
        """Each page of a list, checked, as (items, resourceVersion). A page that is no
        list of objects, a ``continue`` token given twice (a broken aggregated API or
        proxy would loop for ever), more than ``max_list_pages`` pages,
        ``max_list_items`` items or ``max_list_s`` seconds make the cluster unavailable."""
        query: dict[str, str | int | bool] = {"limit": page_size}
        if label_selector:
            query["labelSelector"] = label_selector
        seen_tokens: set[str] = set()
        total = 0
        deadline = time.monotonic() + self.max_list_s
        for _ in range(self.max_list_pages):
            if time.monotonic() > deadline:
                raise self._bad_list(path, f"takes longer than {self.max_list_s:g} s")
            page = self.request("GET", path, query=query)
            items, token, version = self._list_page(path, page)
            total += len(items)
            if total > self.max_list_items:
                raise self._bad_list(path, f"holds more than {self.max_list_items:,} items")
            yield items, version
            if not token:
                return
            if token in seen_tokens:
                raise self._bad_list(path, "gave the same continue token twice")
            seen_tokens.add(token)
            query["continue"] = token
        raise self._bad_list(path, f"goes on past {self.max_list_pages:,} pages")

    def _list_page(self, path: str, page: JsonObject) -> tuple[builtins.list[JsonObject], str, str]:
        """(items, continue token, resourceVersion) of one list page, or
        ``ClusterUnavailable`` naming what is not a list's."""
        items = page.get("items", _MISSING)
        if items is None:  # Go writes an empty slice as null
            items = []
        if not isinstance(items, builtins.list):
            what = "has no items" if items is _MISSING else "has items that are not a list"
            raise self._bad_list(path, what)
        if not all(isinstance(item, dict) for item in items):
            raise self._bad_list(path, "holds an item that is not an object")
        metadata = page.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise self._bad_list(path, "has metadata that is not an object")
        token = metadata.get("continue", "")
        version = metadata.get("resourceVersion", "")
        if not isinstance(token, str) or not isinstance(version, str):
            raise self._bad_list(path, "has a continue token or resourceVersion not a string")
        return items, token, version

    def _bad_list(self, path: str, what: str) -> ClusterUnavailable:
        return ClusterUnavailable(f"API server {self.name}: the list of {path} {what}")

    def watch(
        self,
        path: str,
        *,
        resource_version: str,
        label_selector: str | None = None,
        timeout_s: int = 240,
    ) -> Iterator[JsonObject]:
        """The events of one watch request (ends after ``timeout_s`` or on a dropped
        connection; the caller resumes from the last resourceVersion it saw).
        Raises ``ClusterUnavailable`` when the request cannot be made, or the stream
        sends what is not an event (``_watch_event``) or one larger than an answer."""
        query: dict[str, str | int | bool] = {
            "watch": True,
            "resourceVersion": resource_version,
            "allowWatchBookmarks": True,
            "timeoutSeconds": timeout_s,
        }
        if label_selector:
            query["labelSelector"] = label_selector
        target = (
            path
            + "?"
            + urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()})
        )
        headers = {"Accept": "application/json"}
        auth = self._auth_header()
        if auth:
            headers["Authorization"] = auth
        for hook in self.hooks:
            hook("WATCH", target)
        try:
            response = self._pool.request(
                "GET",
                self.server + target,
                headers=headers,
                timeout=urllib3.Timeout(connect=self._timeout.connect_timeout, read=timeout_s + 30),
                preload_content=False,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise ClusterUnavailable(f"API server {self.name}: cannot watch {path}: {exc}") from exc
        # The server ends the watch after timeout_s; one that does not (bytes now and
        # then keep each read alive) is left after a grace, and the caller resumes.
        deadline = time.monotonic() + timeout_s + WATCH_GRACE_S
        try:
            if response.status != 200:
                body = self._read_body(response, deadline)
                raise _error(response.status, _decode(body))
            line = bytearray()
            for chunk in response.stream(_READ_CHUNK_BYTES):
                start = 0
                while (end := chunk.find(b"\n", start)) >= 0:
                    line += chunk[start:end]
                    start = end + 1
                    if line.strip():
                        yield self._watch_event(path, bytes(line))
                    line.clear()
                line += chunk[start:]
                # An event holds one object: no larger than an answer may be.
                if len(line) > self.max_answer_bytes:
                    raise ClusterUnavailable(
                        f"API server {self.name}: a watch event of {path} is larger than "
                        f"{self.max_answer_bytes:,} bytes (max_answer_bytes)"
                    )
                if time.monotonic() > deadline:
                    return
        except (urllib3.exceptions.HTTPError, OSError, BoundedReadError):
            return  # connection dropped, or its refusal unreadable: the caller resumes
        finally:
            response.close()
            response.release_conn()

    def _watch_event(self, path: str, line: bytes) -> JsonObject:
        """One watch event, checked: a JSON object of a known type whose object is an
        object. Anything else makes the cluster unavailable (the caller relists)."""
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if (
            isinstance(event, dict)
            and event.get("type") in WATCH_EVENT_TYPES
            and isinstance(event.get("object"), dict)
        ):
            return event
        raise ClusterUnavailable(
            f"API server {self.name}: a watch of {path} sent what is not an event: "
            f"{quoted(line.decode(errors='replace'))}"
        )

    def apply(
        self,
        path: str,
        manifest: JsonObject,
        *,
        field_manager: str,
        force: bool = False,
        dry_run: bool = False,
    ) -> JsonObject:
        """Server-side apply (JSON is YAML, so the body goes as apply-patch+yaml)."""
        query: dict[str, str | int | bool] = {"fieldManager": field_manager}
        if force:
            query["force"] = True
        if dry_run:
            query["dryRun"] = "All"
        return self.request("PATCH", path, query=query, body=manifest, content_type=APPLY_PATCH)

    def merge_patch(
        self, path: str, patch: JsonObject, *, field_manager: str, dry_run: bool = False
    ) -> JsonObject:
        query: dict[str, str | int | bool] = {"fieldManager": field_manager}
        if dry_run:
            query["dryRun"] = "All"
        return self.request("PATCH", path, query=query, body=patch, content_type=MERGE_PATCH)

    def delete(
        self,
        path: str,
        *,
        propagation: str = "Background",
        resource_version: str | None = None,
        dry_run: bool = False,
    ) -> JsonObject:
        body: JsonObject = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": propagation,
        }
        if resource_version:
            body["preconditions"] = {"resourceVersion": resource_version}
        query = {"dryRun": "All"} if dry_run else None
        return self.request("DELETE", path, query=query, body=body)

    def close(self) -> None:
        self._pool.clear()


def _retry_after_s(header: str | None) -> float | None:
    """A ``Retry-After`` of delay-seconds, or None (absent, an HTTP date, anything
    else). ASCII digits only: ``str.isdigit`` also takes "²", which ``float`` refuses."""
    if header and header.isascii() and header.isdigit():
        return float(header)
    return None


def _decode(data: bytes) -> JsonObject:
    """An error answer's body as a Status object; a body of any other shape (a proxy's
    HTML page, a JSON list) as a Status whose message is the body's start."""
    try:
        decoded = json.loads(data)
    except ValueError:
        return {"message": data[:QUOTED_CHARS].decode(errors="replace")}
    return decoded if isinstance(decoded, dict) else {"message": cut(str(decoded), QUOTED_CHARS)}


def _error(status: int, body: JsonObject) -> KubeApiError:
    reason = str(body.get("reason", ""))
    message = str(body.get("message", ""))
    if status == 404:
        return NotFound(status, reason, message, body)
    if status == 403:
        return Forbidden(status, reason, message, body)
    if status == 409:
        if any(c.get("reason") == "FieldManagerConflict" for c in status_causes(body)):
            return FieldOwnershipConflict(status, reason, message, body)
        return ResourceConflict(status, reason, message, body)
    return ApiRejected(status, reason, message, body)


# ------------------------------------------------------------------------ API paths


def _collection(base: str, name: str | None, kind: str) -> str:
    return base if name is None else f"{base}/{name_segment(name, kind)}"


def _namespaced(api: str, resource: str, kind: str, namespace: str | None, name: str | None) -> str:
    """``{api}/{resource}`` across namespaces, or in one, and the object ``name``."""
    if namespace is None:
        return _collection(f"{api}/{resource}", name, kind)
    return _collection(f"{api}/namespaces/{namespace_segment(namespace)}/{resource}", name, kind)


# Every name goes through ``dns1123`` (refused unless a valid Kubernetes name): a name
# holding '/' or '..' would address another object (``quote`` keeps '/'). A namespace
# of None is every namespace, a name of None the collection; an empty string is
# refused, not read as either.
def deployments_path(namespace: str | None = None, name: str | None = None) -> str:
    return _namespaced("/apis/apps/v1", "deployments", "Deployment", namespace, name)


def pods_path(namespace: str | None = None, name: str | None = None) -> str:
    return _namespaced("/api/v1", "pods", "Pod", namespace, name)


def nodes_path(name: str | None = None) -> str:
    return _collection("/api/v1/nodes", name, "Node")


def leases_path(namespace: str, name: str | None = None) -> str:
    return _namespaced("/apis/coordination.k8s.io/v1", "leases", "Lease", namespace, name)

"""Signed saved plans: who wrote a plan, not only what it holds.

A saved plan's digest is a checksum (``savedplan``): anyone can edit the file and
recompute it. ``apply PLAN`` therefore checks every write against the desired state
(``plancheck``), but what a cycle decided, the replicas and where a group is placed,
cannot be re-derived at apply time (it came from that moment's metrics and cluster).
A signature closes that gap: ``plan --out --signing-key-file K`` adds an
HMAC-SHA256 of the whole plan under a secret key the CI job holds, and ``apply PLAN
--signing-key-file K`` refuses a plan that is unsigned, signed under another key, or
changed in any byte of its content since it was signed. To rotate the key, apply is
given the old key and the new (the option repeated) until no plan signed with the old
one is left; plan signs with the new one.

HMAC and not a public-key signature: the job that plans and the job that applies are
the same team's CI, which already shares secrets (the kubeconfig), and HMAC needs no
dependency beyond the standard library. The signature is over the same canonical JSON
as the digest (sorted keys, no spaces), digest included, so a re-indented file still
verifies and a changed value never does.

The file's ``signature`` field: ``hmac-sha256:<key id>:<64 hex digits>``. The key id
is the first 16 hex digits of the key's SHA-256: it tells which key signed a plan
(to rotate keys) and, for a key of at least 32 random bytes, reveals nothing of it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.bounded_read import BoundedReadError, read_named_file
from reconciler.errors import PermanentError

ALGORITHM = "hmac-sha256"
# 32 bytes: the HMAC-SHA256 key length RFC 2104 recommends (at least the hash's
# output); `head -c 32 /dev/urandom | base64 > plan.key` gives 44 characters.
MIN_KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096
_SIGNATURE = re.compile(rf"{ALGORITHM}:([0-9a-f]{{16}}):([0-9a-f]{{64}})")


class SigningKeyError(PermanentError):
    """The signing key file cannot serve as a key; names the file and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(f"signing key file {path}: {reason}")


@dataclass(frozen=True)
class SigningKey:
    secret: bytes
    # Which key (the first 16 hex digits of its SHA-256), for messages and rotation.
    key_id: str

    def __repr__(self) -> str:  # never print the secret, not even in a traceback
        return f"SigningKey(key_id={self.key_id!r})"


def key_from_bytes(secret: bytes) -> SigningKey:
    return SigningKey(secret, hashlib.sha256(secret).hexdigest()[:16])


def read_signing_key(path: str | Path) -> SigningKey:
    """The key in the file at ``path``: its bytes without surrounding white space
    (a trailing newline is not part of the key), at least ``MIN_KEY_BYTES`` of them.
    A FIFO, a device or a file over ``MAX_KEY_FILE_BYTES`` is refused unread."""
    try:
        raw = read_named_file(Path(path), MAX_KEY_FILE_BYTES)
    except BoundedReadError as exc:
        raise SigningKeyError(path, exc.reason) from None
    secret = raw.strip()
    if len(secret) < MIN_KEY_BYTES:
        raise SigningKeyError(
            path,
            f"holds {len(secret)} bytes; a key needs at least {MIN_KEY_BYTES} "
            "(e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
        )
    return key_from_bytes(secret)


def _canonical(body: dict[str, Any]) -> bytes:
    # The digest's canonical form (savedplan._hash): what is signed is what is hashed.
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def signature_of(body: dict[str, Any], key: SigningKey) -> str:
    """The ``signature`` field for the plan ``body`` (every top-level field but
    ``signature`` itself)."""
    mac = hmac.new(key.secret, _canonical(body), hashlib.sha256).hexdigest()
    return f"{ALGORITHM}:{key.key_id}:{mac}"


def signed_key_id(signature: object) -> str | None:
    """The key id a well-formed ``signature`` field names; None when malformed."""
    found = _SIGNATURE.fullmatch(signature) if isinstance(signature, str) else None
    return None if found is None else found.group(1)


def signature_problem(data: dict[str, Any], keys: Sequence[SigningKey]) -> str | None:
    """Why the plan ``data`` (the whole parsed file) is not signed by one of ``keys``
    (several while a key is rotated: the old and the new); None when it is."""
    given = ", ".join(key.key_id for key in keys)
    signature = data.get("signature")
    if signature is None:
        return (
            f"is not signed: apply was given a signing key (key {given}), so it applies "
            "only plans written by `plan --out --signing-key-file` with that key"
        )
    key_id = signed_key_id(signature)
    if key_id is None:
        return f"signature is not of the form {ALGORITHM}:<16 hex>:<64 hex>"
    key = next((k for k in keys if k.key_id == key_id), None)
    if key is None:
        return f"is signed with key {key_id}, not with a key given (key {given})"
    body = {k: v for k, v in data.items() if k != "signature"}
    if not hmac.compare_digest(signature, signature_of(body, key)):
        return (
            f"signature (key {key.key_id}) does not match the content: the file was "
            "changed after it was signed"
        )
    return None

"""Signed saved plans (pure): a plan signed with the key applies; with a key given,
an unsigned plan, one signed with another key, and one changed in any value since it
was signed (even with its digest recomputed) are refused, naming the file and why."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.apply import plansign
from reconciler.apply.plansign import (
    MIN_KEY_BYTES,
    SigningKeyError,
    key_from_bytes,
    read_signing_key,
    signature_of,
    signature_problem,
)
from reconciler.apply.savedplan import PlanFileError, _hash, read_plan, to_json, write_plan
from tests.apply.test_savedplan import sample

KEY = key_from_bytes(b"k" * MIN_KEY_BYTES)
OTHER_KEY = key_from_bytes(b"o" * MIN_KEY_BYTES)


def _written(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def _redigested(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its digest recomputed, as anyone can (the signature kept)."""
    body = {k: v for k, v in data.items() if k not in ("digest", "signature")}
    return {**data, "digest": "sha256:" + _hash(body)}


def test_a_signed_plan_reads_back_with_its_key_and_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(sample(), path, KEY)
    signature = json.loads(path.read_text())["signature"]
    assert signature.startswith(f"hmac-sha256:{KEY.key_id}:")
    plan = read_plan(path, (KEY,))
    assert plan.signed_by == KEY.key_id
    assert plan.clusters == sample().clusters and plan.source == sample().source


def test_a_signed_plan_reads_without_the_key_as_claimed_not_verified(tmp_path: Path) -> None:
    # apply without --signing-key-file checks the plan as unsigned (and says so).
    path = tmp_path / "plan.json"
    write_plan(sample(), path, KEY)
    assert read_plan(path).signed_by == KEY.key_id
    write_plan(sample(), path)
    assert read_plan(path).signed_by is None


def test_with_a_key_an_unsigned_plan_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(sample(), path)
    with pytest.raises(PlanFileError, match="is not signed") as info:
        read_plan(path, (KEY,))
    assert str(path) in str(info.value)


def test_a_plan_signed_with_another_key_is_refused_naming_both_keys(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    write_plan(sample(), path, OTHER_KEY)
    with pytest.raises(PlanFileError) as info:
        read_plan(path, (KEY,))
    assert f"signed with key {OTHER_KEY.key_id}" in str(info.value)
    assert KEY.key_id in str(info.value)


def test_while_rotating_a_plan_signed_with_the_old_key_or_the_new_is_applied(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan.json"
    for signer in (OTHER_KEY, KEY):
        write_plan(sample(), path, signer)
        assert read_plan(path, (KEY, OTHER_KEY)).signed_by == signer.key_id
    retired = key_from_bytes(b"r" * MIN_KEY_BYTES)
    write_plan(sample(), path, retired)
    with pytest.raises(PlanFileError) as info:
        read_plan(path, (KEY, OTHER_KEY))
    assert f"signed with key {retired.key_id}, not with a key given" in str(info.value)
    assert f"{KEY.key_id}, {OTHER_KEY.key_id}" in str(info.value)


def test_a_forged_signature_claiming_the_right_key_is_refused(tmp_path: Path) -> None:
    data = to_json(sample(), KEY)
    data["signature"] = f"hmac-sha256:{KEY.key_id}:" + "0" * 64
    with pytest.raises(PlanFileError, match="does not match the content"):
        read_plan(_written(tmp_path, data), (KEY,))


def test_replicas_changed_and_the_digest_recomputed_is_refused(tmp_path: Path) -> None:
    # What the scope and content checks cannot see (the replicas the cycle decided):
    # the signature does.
    data = to_json(sample(), KEY)
    data["clusters"][0]["writes"][0]["manifest"]["spec"]["replicas"] = 300
    path = _written(tmp_path, _redigested(data))
    read_plan(path)  # without the key it is a well-formed plan
    with pytest.raises(PlanFileError, match="changed after it was signed"):
        read_plan(path, (KEY,))


@pytest.mark.parametrize("signature", ["", "hmac-sha256:abc:def", 7, "sha256:" + "0" * 64])
def test_a_malformed_signature_is_refused_even_without_a_key(
    tmp_path: Path, signature: object
) -> None:
    data = {**to_json(sample()), "signature": signature}
    with pytest.raises(PlanFileError, match="signature is not of the form"):
        read_plan(_written(tmp_path, data))


def _json_leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _json_leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _json_leaves(v, (*path, i))]
    return [path]


SIGNED = to_json(sample(), KEY)
LEAVES = [p for p in _json_leaves(SIGNED) if p[0] not in ("digest", "signature")]


@given(leaf=st.sampled_from(LEAVES), replacement=st.one_of(st.integers(), st.text(max_size=8)))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_value_changed_after_signing_fails_the_signature(
    leaf: tuple[Any, ...], replacement: object
) -> None:
    data = json.loads(json.dumps(SIGNED))
    holder = data
    for step in leaf[:-1]:
        holder = holder[step]
    if holder[leaf[-1]] == replacement and type(holder[leaf[-1]]) is type(replacement):
        return  # not a change
    holder[leaf[-1]] = replacement
    assert signature_problem(data, (KEY,)) is not None


def test_the_signature_covers_the_canonical_form_not_the_layout() -> None:
    # A re-indented or key-reordered file is the same plan: it still verifies.
    data = to_json(sample(), KEY)
    reordered = json.loads(json.dumps(data, indent=7, sort_keys=False))
    assert signature_problem(dict(reversed(list(reordered.items()))), (KEY,)) is None
    body = {k: v for k, v in data.items() if k != "signature"}
    assert data["signature"] == signature_of(body, KEY)


def test_a_key_file_is_read_without_its_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "plan.key"
    path.write_bytes(b"s" * MIN_KEY_BYTES + b"\n")
    assert read_signing_key(path) == key_from_bytes(b"s" * MIN_KEY_BYTES)
    assert "s" * 8 not in repr(read_signing_key(path))  # the secret is never printed


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "holds 0 bytes"),
        (b"short\n", "holds 5 bytes"),
        (b"x" * (plansign.MAX_KEY_FILE_BYTES + 1), "larger than"),
    ],
)
def test_a_key_file_that_cannot_serve_is_refused_naming_it(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "plan.key"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=reason) as info:
        read_signing_key(path)
    assert str(path) in str(info.value)


def test_a_missing_key_file_or_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    with pytest.raises(SigningKeyError, match="cannot be read"):
        read_signing_key(tmp_path / "absent.key")
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo)
    with pytest.raises(SigningKeyError, match=str(fifo)):
        read_signing_key(fifo)

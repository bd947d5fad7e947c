"""The ``--auth-config`` file: read (JSON when it parses as JSON, else YAML), validated, turned into a
:class:`~ferry.server.security.auth.Policy`. Every error names the file and the bad key (``identities[2] (ops).scopes:
unknown scopes ['infer']``); keys this reader does not know are ignored, so operators' tooling may add its own."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ferry.client.errors import InvalidArgument
from ferry.server.security.auth import SCOPES, Identity, Policy, Rate, Restriction


def read_policy(path: Path, restrictions: Sequence[Restriction] = ()) -> Policy:
    """Parse and validate the auth file (JSON when it parses as JSON, else YAML); InvalidArgument names the file
    and the bad key."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"auth config {os.fspath(path)!r}: cannot read it: {err}") from None
    return parse_policy(_load(text, os.fspath(path)), os.fspath(path), restrictions)


def _load(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise InvalidArgument(f"auth config {source!r}: neither JSON nor YAML: {err}") from None


def parse_policy(data: Any, source: str = "auth config", restrictions: Sequence[Restriction] = ()) -> Policy:
    where = f"auth config {source!r}"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InvalidArgument(f"{where}: expected a mapping with 'anonymous' and 'identities'")
    anonymous_spec = data.get("anonymous", {"scopes": ["health"]})
    anonymous = _identity(anonymous_spec, f"{where}: anonymous", anonymous=True)
    entries = data.get("identities", [])
    if entries is None:
        entries = []
    if not isinstance(entries, list):
        raise InvalidArgument(f"{where}: identities: expected a list")
    identities = [_identity(entry, f"{where}: identities[{i}]") for i, entry in enumerate(entries)]
    seen: dict[Any, str] = {}
    for i, identity in enumerate(identities):
        for kind, key in (
            ("name", identity.name),
            ("token_sha256", identity.token_sha256),
            ("certificate.cn", identity.cn),
            ("certificate.san", identity.san),
        ):
            if key is None:
                continue
            if (kind, key) in seen:
                raise InvalidArgument(f"{where}: identities[{i}].{kind}: the same as {seen[(kind, key)]}'s")
            seen[(kind, key)] = f"identities[{i}]"
    return Policy.build(anonymous, identities, restrictions)


def _identity(spec: Any, where: str, anonymous: bool = False) -> Identity:
    if not isinstance(spec, dict):
        raise InvalidArgument(f"{where}: expected a mapping")
    name = "anonymous"
    if not anonymous:
        given = spec.get("name")
        if not isinstance(given, str) or not given.strip():
            raise InvalidArgument(f"{where}.name: a non-empty string is required")
        name = given
        if name == "anonymous" or name.startswith("triton:"):
            raise InvalidArgument(f"{where}.name: {name!r} is reserved")
        where = f"{where} ({name})"
    scopes = _strings(spec.get("scopes", []), f"{where}.scopes")
    if unknown := [s for s in scopes if s not in SCOPES]:
        raise InvalidArgument(f"{where}.scopes: unknown scopes {unknown} (scopes: {', '.join(SCOPES)})")
    models = tuple(_strings(spec.get("models", []), f"{where}.models"))
    if "" in models:
        raise InvalidArgument(f"{where}.models: an empty name")
    rate = _rate(spec["rate"], f"{where}.rate") if spec.get("rate") is not None else None
    if anonymous:
        for key in ("token_sha256", "certificate"):
            if key in spec:
                raise InvalidArgument(f"{where}.{key}: the anonymous identity has no credential")
        return Identity("anonymous", frozenset(scopes), models, rate, anonymous=True)
    token, certificate = spec.get("token_sha256"), spec.get("certificate")
    if (token is None) == (certificate is None):
        raise InvalidArgument(f"{where}: exactly one of token_sha256 and certificate is required")
    digest = cn = san = None
    if token is not None:
        if not isinstance(token, str) or len(token) != 64 or any(c not in "0123456789abcdefABCDEF" for c in token):
            raise InvalidArgument(f"{where}.token_sha256: expected 64 hex digits (`ferry auth hash-token` prints it)")
        digest = bytes.fromhex(token)
    else:
        if not isinstance(certificate, dict) or len(certificate) != 1 or next(iter(certificate)) not in ("cn", "san"):
            raise InvalidArgument(f"{where}.certificate: expected {{cn: NAME}} or {{san: NAME}}")
        kind, value = next(iter(certificate.items()))
        if not isinstance(value, str) or not value:
            raise InvalidArgument(f"{where}.certificate.{kind}: a non-empty string is required")
        cn, san = (value, None) if kind == "cn" else (None, value)
    return Identity(name, frozenset(scopes), models, rate, digest, cn, san)


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{where}: expected a list of strings")
    return value


def _rate(spec: Any, where: str) -> Rate:
    if not isinstance(spec, dict) or "per_second" not in spec:
        raise InvalidArgument(f"{where}: expected {{per_second: N, burst: N}}")
    numbers: dict[str, float] = {}
    for key in ("per_second", "burst"):
        value = spec.get(key, spec["per_second"])
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e9:
            raise InvalidArgument(f"{where}.{key}: expected a number in (0, 1e9], got {value!r}")
        numbers[key] = float(value)
    per_second, burst = numbers["per_second"], numbers["burst"]
    if burst < 1:
        raise InvalidArgument(f"{where}.burst: must be at least 1, got {burst!r}")
    return Rate(per_second, burst)


def open_policy(restrictions: Sequence[Restriction]) -> Policy:
    """The rules without an auth file: everyone anonymous, every scope but Triton's restricted groups, every
    model (``--audit-log`` or the restricted-protocol flags alone)."""
    return Policy.build(Identity("anonymous", frozenset(SCOPES), ("*",), anonymous=True), (), restrictions)


__all__ = ["open_policy", "parse_policy", "read_policy"]

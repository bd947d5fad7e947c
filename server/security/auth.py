"""Identities and permissions: scopes, Triton's restricted-protocol flags, and who a call is. The rules come from
the ``--auth-config`` file (read by :mod:`~ferry.server.security.authfile`; YAML or JSON; keys other than these are
ignored, so operators' tooling may add its own)::

    anonymous: {scopes: [health]}                # the default: Kubernetes probes keep working
    identities:
      - name: checkout-service
        token_sha256: "9f86d0..."                # `ferry auth hash-token` prints it; the token is never stored
        scopes: [inference, metadata]
        models: ["tiny", "digits*"]              # names or fnmatch globs; none by default
        rate: {per_second: 200, burst: 400}      # optional token bucket
      - name: ops
        certificate: {cn: "ops.internal"}        # or {san: "spiffe://..."}: a verified client certificate
        scopes: [model-repository, statistics, trace, metadata, health]
        models: ["*"]

Scopes are Triton's API groups (``--grpc-restricted-protocol``) plus Ferry's ``outcomes``; :data:`METHOD_SCOPES` maps
every method Ferry serves to one. A call is identified (:meth:`Policy.identify`) by, in this order: its
``authorization: Bearer <token>`` (a value that is present but malformed or unknown is refused, never ignored), a
verified client certificate's subject CN or SAN (read only through ``context.auth_context()``), Triton's
restricted-protocol headers, else it is anonymous.

Tokens: only their SHA-256 is kept. A presented token is hashed and looked up in a dict keyed by the digest, then
compared with ``hmac.compare_digest``. The lookup's timing depends on the *digest* of what the caller sent, which
tells the caller nothing about a stored token (learning a stored digest byte by byte would still need a preimage
of it); the final comparison is constant-time all the same. Tokens never reach a log, a trace, an error message or
the audit log: messages name the identity or say "invalid bearer token".
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from ferry.client.errors import InvalidArgument

TRITON_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
"""Triton's API groups, as ``--grpc-restricted-protocol`` names them."""
SCOPES = (*TRITON_GROUPS, "outcomes")

_INFERENCE = "inference.GRPCInferenceService"
METHOD_SCOPES: dict[str, str] = {
    **{f"/{_INFERENCE}/{m}": "health" for m in ("ServerLive", "ServerReady", "ModelReady")},
    **{f"/{_INFERENCE}/{m}": "metadata" for m in ("ServerMetadata", "ModelMetadata")},
    **{f"/{_INFERENCE}/{m}": "inference" for m in ("ModelInfer", "ModelStreamInfer")},
    f"/{_INFERENCE}/ModelConfig": "model-config",
    f"/{_INFERENCE}/ModelStatistics": "statistics",
    **{
        f"/{_INFERENCE}/{m}": "model-repository"
        for m in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
    },
    **{
        f"/{_INFERENCE}/{kind}SharedMemory{op}": "shared-memory"
        for kind in ("System", "Cuda")
        for op in ("Status", "Register", "Unregister")
    },
    f"/{_INFERENCE}/TraceSetting": "trace",
    f"/{_INFERENCE}/LogSettings": "logging",
    "/grpc.health.v1.Health/Check": "health",
    "/grpc.health.v1.Health/Watch": "health",
    "/grpc.health.v1.Health/List": "health",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": "metadata",  # what the server offers
    "/ferry.v1.OutcomeService/ReportOutcomes": "outcomes",
}
"""Every method Ferry serves and the scope it needs. A method missing here is refused to everyone (fail closed),
and a test enumerates the registered methods against this table."""

MAX_AUTHORIZATION_BYTES = 4096
"""A longer ``authorization`` value is refused unparsed. Below grpc-core's default 8 KiB metadata limit, so both
transports answer it the same way; a bearer token (or a JWT) is far shorter."""

TRITON_GRPC_HEADER = "triton-grpc-protocol-"


class Denied(Exception):
    """A call refused before its handler runs: ``code`` and ``message`` for the caller, ``reason`` for the metrics
    and the audit log (``malformed``, ``invalid_token``, ``no_credential``, ``scope``, ``rate``)."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, identity: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.identity = identity


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a call is: a name, the scopes it holds, the models it may see, its rate limit."""

    name: str
    scopes: frozenset[str]
    models: tuple[str, ...] = ()
    rate: Rate | None = None
    token_sha256: bytes | None = None
    cn: str | None = None
    san: str | None = None
    anonymous: bool = False
    every_model: bool = field(init=False, default=False)
    """``models`` has ``*``: nothing to check per model."""
    _seen: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "every_model", "*" in self.models)

    def sees(self, model: str) -> bool:
        """Whether ``model`` is on this identity's allow-list (names or fnmatch globs; answers cached, bounded)."""
        seen = self._seen.get(model)
        if seen is None:
            seen = any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)
            if len(self._seen) >= 4096:  # model names are the caller's choice: keep the cache bounded
                self._seen.clear()
            self._seen[model] = seen
        return seen


@dataclass(frozen=True, slots=True)
class Restriction:
    """Triton's ``<groups>:<key>=<value>``: a request header ``header`` equal to the value grants ``groups``."""

    groups: frozenset[str]
    header: str
    value_sha256: bytes
    key: str


def parse_restriction(text: str, grpc_form: bool) -> Restriction:
    """``--grpc-restricted-protocol`` (header ``triton-grpc-protocol-<key>``) or ``--http-restricted-api`` (header
    ``<key>``) in Triton's syntax: ``<group>[,<group>...]:<key>=<value>``."""
    flag = "--grpc-restricted-protocol" if grpc_form else "--http-restricted-api"
    groups_text, colon, rest = text.partition(":")
    key, equals, value = rest.partition("=")
    if not colon or not equals or not key or not value or not groups_text:
        raise InvalidArgument(f"{flag} {text!r}: expected <group>[,<group>...]:<key>=<value>")
    groups = [g.strip() for g in groups_text.split(",")]
    if unknown := [g for g in groups if g not in TRITON_GROUPS]:
        raise InvalidArgument(f"{flag} {text!r}: unknown groups {unknown} (groups: {', '.join(TRITON_GROUPS)})")
    header = (TRITON_GRPC_HEADER + key if grpc_form else key).lower()
    return Restriction(frozenset(groups), header, hashlib.sha256(value.encode()).digest(), key)


def hash_token(token: str) -> str:
    """The ``token_sha256`` of a bearer token: the SHA-256 hex digest of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Policy:
    """One version of the rules; a reload builds a new one and swaps it in whole."""

    anonymous: Identity
    identities: tuple[Identity, ...] = ()
    restrictions: tuple[Restriction, ...] = ()
    by_token: Mapping[bytes, Identity] = field(default_factory=dict)
    by_cn: Mapping[str, Identity] = field(default_factory=dict)
    by_san: Mapping[str, Identity] = field(default_factory=dict)
    _granted: dict[frozenset[int], Identity] = field(default_factory=dict, compare=False, repr=False)
    _accepted: dict[str | bytes, Identity] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, anonymous: Identity, identities: Sequence[Identity] = (), restrictions: Sequence[Restriction] = ()
    ) -> Policy:
        restricted = frozenset().union(*(r.groups for r in restrictions))
        scopes = anonymous.scopes - restricted
        anonymous = Identity("anonymous", scopes, anonymous.models, anonymous.rate, anonymous=True)
        return cls(
            anonymous,
            tuple(identities),
            tuple(restrictions),
            {i.token_sha256: i for i in identities if i.token_sha256 is not None},
            {i.cn: i for i in identities if i.cn is not None},
            {i.san: i for i in identities if i.san is not None},
        )

    def identify(self, metadata: Iterable[tuple[str, str | bytes]], context: Any) -> Identity:
        """The identity of a call from its metadata and (for certificates) ``context.auth_context()``; raises
        :class:`Denied` (UNAUTHENTICATED) for a malformed or unknown credential."""
        authorization: str | bytes | None = None
        matched: set[int] | None = None
        restrictions = self.restrictions
        for key, value in metadata or ():  # a context may hand None for no metadata
            if key == "authorization":
                if authorization is not None:
                    raise Denied(grpc.StatusCode.UNAUTHENTICATED, "malformed", "more than one authorization header")
                authorization = value
            elif restrictions:
                for i, restriction in enumerate(restrictions):
                    if key == restriction.header and _matches(value, restriction.value_sha256):
                        matched = matched or set()
                        matched.add(i)
        if authorization is not None:
            # A header value already accepted under these rules maps straight to its identity: the lookup hashes
            # the presented value with Python's keyed SipHash and compares only on a full hash match, so its timing
            # says nothing about how much of a stored token a guess shares. New values take the full path.
            identity = self._accepted.get(authorization)
            if identity is None:
                identity = self._bearer(authorization)
                if len(self._accepted) >= 1024:  # bounded: only accepted values get here, but their spellings vary
                    self._accepted.clear()
                self._accepted[authorization] = identity
            return identity
        if self.by_cn or self.by_san:
            identity = self._certificate(context)
            if identity is not None:
                return identity
        if matched:
            return self._granted_identity(frozenset(matched))
        return self.anonymous

    def _bearer(self, value: str | bytes) -> Identity:
        if not isinstance(value, str) or len(value) > MAX_AUTHORIZATION_BYTES:
            size = len(value)
            raise Denied(
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed",
                f"authorization header of {size} bytes: over the {MAX_AUTHORIZATION_BYTES}-byte limit"
                if size > MAX_AUTHORIZATION_BYTES
                else "authorization header is not text",
            )
        if not (value.isascii() and value.isprintable()):
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "malformed", "authorization header is not printable ASCII")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token or " " in token:
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "malformed", 'authorization header must be "Bearer <token>"')
        digest = hashlib.sha256(token.encode("ascii")).digest()
        identity = self.by_token.get(digest)
        if identity is None or not hmac.compare_digest(identity.token_sha256 or b"", digest):
            raise Denied(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", "invalid bearer token")
        return identity

    def _certificate(self, context: Any) -> Identity | None:
        read = getattr(context, "auth_context", None)  # C1: every context has it; a transport without TLS: empty
        if read is None:
            return None
        properties = read() or {}
        for value in properties.get("x509_common_name", ()):
            identity = self.by_cn.get(_text(value))
            if identity is not None:
                return identity
        for value in properties.get("x509_subject_alternative_name", ()):
            identity = self.by_san.get(_text(value))
            if identity is not None:
                return identity
        return None

    def _granted_identity(self, matched: frozenset[int]) -> Identity:
        """The anonymous identity widened by the Triton groups whose headers matched (Triton has no per-model
        control: every model)."""
        identity = self._granted.get(matched)
        if identity is None:
            chosen = [self.restrictions[i] for i in sorted(matched)]
            scopes = self.anonymous.scopes.union(*(r.groups for r in chosen))
            name = "triton:" + "+".join(r.key for r in chosen)
            identity = self._granted[matched] = Identity(name, scopes, ("*",), self.anonymous.rate)
        return identity


def _matches(value: str | bytes, digest: bytes) -> bool:
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return hmac.compare_digest(hashlib.sha256(raw).digest(), digest)


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


__all__ = [
    "MAX_AUTHORIZATION_BYTES",
    "METHOD_SCOPES",
    "SCOPES",
    "TRITON_GROUPS",
    "Denied",
    "Identity",
    "Policy",
    "Rate",
    "Restriction",
    "hash_token",
    "parse_restriction",
]

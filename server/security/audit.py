"""The audit log (``--audit-log FILE``): who did what to the server, as JSON lines, written off the request path.

The request path builds one :class:`AuditEvent` and hands it to the prediction log's writer
(:class:`~ferry.server.observability.predlog.PredictionLog`: a bounded queue, one writer thread, the same size
rotation ``path.1`` … ``path.N``); a full queue drops the event and counts it (``ferry_audit_dropped_total``), never
blocks a call. Event names come from the OWASP Logging Vocabulary:

- ``authn_login_fail``: a missing, malformed or unknown credential (UNAUTHENTICATED);
- ``authz_fail``: a valid credential without the scope (PERMISSION_DENIED), or naming a model it may not see
  (answered NOT_FOUND, as an unknown model);
- ``excess_rate_limit_exceeded``: over the identity's rate (RESOURCE_EXHAUSTED);
- ``authz_admin``: a change of server state by a caller (``action``: ``model_load``, ``model_unload``,
  ``trace_setting``), with its result, or by the operator (``cert_reload``);
- ``authz_change``: the auth rules reloaded (``action``: ``auth_reload``; a failed reload keeps the old rules and
  says why in ``detail``);
- ``sensitive_read``: an allowed inference call, sampled at ``--audit-sample-rate``.

One line per event, every field always present (``""`` when it does not apply)::

    {"time": "2026-12-02T14:00:00.000000Z", "event": "authz_fail", "identity": "checkout-service",
     "peer": "ipv4:127.0.0.1:53412", "method": "/inference.GRPCInferenceService/RepositoryModelUnload",
     "model": "tiny", "version": "", "code": "PERMISSION_DENIED", "request_id": "", "trace_id": "", "action": "",
     "detail": "..."}

No credential ever reaches it: ``detail`` carries the server's own message, which names identities, not tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import orjson

from ferry.server.observability.predlog import PredictionLog

AUTHN_FAIL = "authn_login_fail"
AUTHZ_FAIL = "authz_fail"
AUTHZ_ADMIN = "authz_admin"
AUTHZ_CHANGE = "authz_change"
RATE_EXCEEDED = "excess_rate_limit_exceeded"
ALLOWED = "sensitive_read"
EVENTS = (AUTHN_FAIL, AUTHZ_FAIL, AUTHZ_ADMIN, AUTHZ_CHANGE, RATE_EXCEEDED, ALLOWED)


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event: str
    identity: str = ""
    peer: str = ""
    method: str = ""
    model: str = ""
    version: str = ""
    code: str = ""
    request_id: str = ""
    trace_id: str = ""
    action: str = ""
    detail: str = ""
    timestamp: float = field(default_factory=time.time)


def encode_event(event: AuditEvent) -> bytes:
    """The JSON line (without its newline) of one event; runs in the writer thread."""
    stamp = datetime.fromtimestamp(event.timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return orjson.dumps(
        {
            "time": stamp,
            "event": event.event,
            "identity": event.identity,
            "peer": event.peer,
            "method": event.method,
            "model": event.model,
            "version": event.version,
            "code": event.code,
            "request_id": event.request_id,
            "trace_id": event.trace_id,
            "action": event.action,
            "detail": event.detail,
        }
    )


class AuditLog:
    """The audit sink: :meth:`record` never blocks; ``dropped`` and ``written`` count for the metrics."""

    def __init__(self, path: Path, max_bytes: int = 64 << 20, backups: int = 5, queue_size: int = 10_000) -> None:
        self._writer = PredictionLog(path, max_bytes, backups, queue_size, encode=encode_event, label="audit log")
        self.path = self._writer.path

    def record(self, event: AuditEvent) -> bool:
        return self._writer.record(event)

    def system(self, event: str, action: str, code: str = "OK", detail: str = "") -> bool:
        """An event of the operator's, not of a call (a reload): the identity is ``system``."""
        return self.record(AuditEvent(event, identity="system", action=action, code=code, detail=detail))

    @property
    def written(self) -> int:
        return self._writer.written

    @property
    def dropped(self) -> int:
        return self._writer.dropped

    def close(self) -> None:
        self._writer.close()


def code_of(err: BaseException | None, context: Any) -> str:
    if isinstance(err, asyncio.CancelledError):
        return "CANCELLED"
    code = getattr(err, "code", None) if err is not None else None
    if not isinstance(code, grpc.StatusCode):
        read = getattr(context, "code", None)
        with contextlib.suppress(Exception):
            code = read() if read is not None else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if err is None else "UNKNOWN"


def model_of(request: Any) -> tuple[str, str]:
    if request is None:
        return "", ""
    for name, version in (("model_name", "model_version"), ("name", "version")):
        value = getattr(request, name, None)
        if isinstance(value, str):
            return value, str(getattr(request, version, "") or "")
    service = getattr(request, "service", None)
    return (service, "") if isinstance(service, str) else ("", "")


def peer_of(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return ""


def trace_id_of(context: Any) -> str:
    """The W3C trace id of the caller's ``traceparent`` (``00-<trace id>-<span id>-<flags>``), else ""."""
    with contextlib.suppress(Exception):
        for key, value in context.invocation_metadata():
            if key == "traceparent" and isinstance(value, str):
                parts = value.split("-")
                if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
                    return parts[1]
    return ""


__all__ = [
    "ALLOWED",
    "AUTHN_FAIL",
    "AUTHZ_ADMIN",
    "AUTHZ_CHANGE",
    "AUTHZ_FAIL",
    "EVENTS",
    "RATE_EXCEEDED",
    "AuditEvent",
    "AuditLog",
    "code_of",
    "encode_event",
    "model_of",
    "peer_of",
    "trace_id_of",
]

"""What each method needs beyond its scope: the requests the guard rewrites and the replies it filters so that a
caller never learns of a model it may not see, and the calls it audits.

Most methods need nothing here: the repository answers a hidden model as an unknown one on every lookup by name
(:meth:`~ferry.server.security.guard.Guard.visible`). The rest are lists (``RepositoryIndex``, ``ModelStatistics``
without a name, health's ``List``), health's per-model services and outcomes, which never reach the repository.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ferry.server.security.auth import METHOD_SCOPES, Identity

if TYPE_CHECKING:
    from ferry.server.security.guard import Guard

HIDDEN = "/"
"""The name a hidden model is asked about under where the guard rewrites a request (health, outcomes): a model
directory cannot be called that, so the answer is the one for a model that does not exist."""

_INFERENCE = "/inference.GRPCInferenceService/"


@dataclass(frozen=True, slots=True)
class Rule:
    method: str
    scope: str
    admin: str = ""  # the audit action of a state change ("" = none)
    sampled: bool = False  # an inference call: audited at the sample rate
    filter: Callable[[Guard, Identity, Any, Any], Any] | None = None  # the reply as the caller may see it
    rewrite: Callable[[Guard, Any], Any] | None = None  # the request as the caller may ask it


def _index(guard: Guard, identity: Identity, request: Any, reply: Any) -> Any:
    return type(reply)(models=[m for m in reply.models if identity.sees(m.name)])


def _statistics(guard: Guard, identity: Identity, request: Any, reply: Any) -> Any:
    if request.name:  # one model: the repository already answered it as the caller may see it
        return reply
    return type(reply)(model_stats=[s for s in reply.model_stats if identity.sees(s.name)])


def _health_list(guard: Guard, identity: Identity, request: Any, reply: Any) -> Any:
    statuses = {k: v for k, v in reply.statuses.items() if not k or k in guard.services or identity.sees(k)}
    return type(reply)(statuses=statuses)


def _health(guard: Guard, request: Any) -> Any:
    service = request.service
    if service and service not in guard.services and not guard.visible(service):
        return type(request)(service=HIDDEN)
    return request


def _outcomes(guard: Guard, request: Any) -> Any:
    hidden = [i for i, o in enumerate(request.outcomes) if o.model_name and not guard.visible(o.model_name)]
    if not hidden:
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    for i in hidden:
        copy.outcomes[i].model_name = HIDDEN
    return copy


def changes_state(rule: Rule, request: Any) -> bool:
    """Whether this call of an admin method changes the server (a TraceSetting with no settings only reads)."""
    return bool(rule.admin) and (rule.admin != "trace_setting" or bool(request.settings))


SPECIAL: dict[str, dict[str, Any]] = {
    f"{_INFERENCE}RepositoryIndex": {"filter": _index},
    f"{_INFERENCE}ModelStatistics": {"filter": _statistics},
    f"{_INFERENCE}RepositoryModelLoad": {"admin": "model_load"},
    f"{_INFERENCE}RepositoryModelUnload": {"admin": "model_unload"},
    f"{_INFERENCE}TraceSetting": {"admin": "trace_setting"},
    f"{_INFERENCE}ModelInfer": {"sampled": True},
    f"{_INFERENCE}ModelStreamInfer": {"sampled": True},
    "/grpc.health.v1.Health/Check": {"rewrite": _health},
    "/grpc.health.v1.Health/Watch": {"rewrite": _health},
    "/grpc.health.v1.Health/List": {"filter": _health_list},
    "/ferry.v1.OutcomeService/ReportOutcomes": {"rewrite": _outcomes},
}
RULES = {method: Rule(method, scope, **SPECIAL.get(method, {})) for method, scope in METHOD_SCOPES.items()}


__all__ = ["HIDDEN", "RULES", "Rule", "changes_state"]

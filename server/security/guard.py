"""The guard: every registered gRPC method checks who calls and what it may do before its handler runs.

:meth:`Guard.registrar` wraps the object services register on (a grpc.aio server, or Ferry's
:class:`~ferry.server.transport.Services` table, which the REST routes dispatch through too), so each
``grpc.RpcMethodHandler`` of every service is replaced by a guarded one as it is registered: nothing registered
can escape it, and a method :data:`~ferry.server.security.auth.METHOD_SCOPES` does not name is refused to everyone.
It reads calls only through the context surface every transport offers (``invocation_metadata()``, ``peer()``,
``auth_context()``, ``abort()``).

Per call: identify (:meth:`Policy.identify`: UNAUTHENTICATED for a bad credential), check the method's scope
(UNAUTHENTICATED for the anonymous caller, PERMISSION_DENIED for an identity), take a token from the identity's
bucket (RESOURCE_EXHAUSTED with the seconds to wait), then run the handler with the caller current
(a context variable). Models: the repository asks :meth:`Guard.visible` whenever it looks a model up by name, so a
model the caller may not see is answered by the repository's own "unknown model" path, word for word, on every
method (a stream's requests each); ``RepositoryIndex`` and ``ModelStatistics`` list only visible models; health's
per-model services and outcomes for hidden models are asked about under a name no model can have.
A request stream (``ModelStreamInfer``) is identified once, when it opens; with a rate, its requests are paced
by the identity's bucket rather than refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.core import CounterMetricFamily, Metric

from ferry.client.errors import FerryError, InvalidArgument
from ferry.server.config import ServerConfig
from ferry.server.security.audit import (
    ALLOWED,
    AUTHN_FAIL,
    AUTHZ_ADMIN,
    AUTHZ_CHANGE,
    AUTHZ_FAIL,
    RATE_EXCEEDED,
    AuditEvent,
    AuditLog,
    code_of,
    model_of,
    peer_of,
    trace_id_of,
)
from ferry.server.security.auth import Denied, Identity, Policy, parse_restriction
from ferry.server.security.authfile import open_policy, read_policy
from ferry.server.security.ratelimit import TokenBucket
from ferry.server.security.registrar import Registrar, refuse_all, unimplemented_stub
from ferry.server.security.rules import RULES, Rule, changes_state

log = logging.getLogger(__name__)

_FIELDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
FAILURE_REASONS = ("malformed", "invalid_token", "no_credential", "scope", "model")


class _Caller:
    """The current call as :meth:`Guard.visible` sees it."""

    __slots__ = ("context", "hidden", "identity", "method", "request")

    def __init__(self, identity: Identity, context: Any, method: str, request: Any) -> None:
        self.identity = identity
        self.context = context
        self.method = method
        self.request = request
        self.hidden: set[str] | None = None


_CALLER: ContextVar[_Caller | None] = ContextVar("ferry_caller", default=None)


class Guard:
    """Enforces one :class:`Policy` (swapped whole by :meth:`reload`) on every method it wrapped."""

    def __init__(
        self,
        policy: Policy,
        *,
        audit: AuditLog | None = None,
        sample_rate: float = 0.0,
        load: Callable[[], Policy] | None = None,
        watch: Path | None = None,
        poll_s: float = 2.0,
    ) -> None:
        """``load`` builds the rules anew (from the auth file) for :meth:`reload`; ``watch`` is that file, looked
        at every ``poll_s`` seconds once :meth:`start` ran."""
        self.policy = policy
        self.audit = audit
        self.sample_rate = sample_rate
        self._random = random.Random().random
        self._load = load
        self._watch = watch
        self._signature = _signature(watch) if watch is not None else None  # of the file the rules came from
        self._poll_s = poll_s
        self._watcher: asyncio.Task[None] | None = None
        self._buckets: dict[str, TokenBucket] = {}
        self.failures: dict[str, int] = dict.fromkeys(FAILURE_REASONS, 0)
        self.rate_limited: dict[str, int] = {}
        self.services: set[str] = set()  # the gRPC services registered: health names them too, not models
        self.methods: dict[str, str | None] = {}  # every method wrapped, with its scope (None: refused to all)

    @classmethod
    def from_config(cls, config: ServerConfig, audit: AuditLog | None) -> Guard | None:
        """The server's guard, or None when nothing asks for one (no auth file, no restricted-protocol flag, no
        audit log): then nothing is wrapped and calls cost what they did. Raises InvalidArgument for a bad auth
        file or flag, naming it."""
        restrictions = []
        for values, grpc_form in ((config.grpc_restricted_protocol, True), (config.http_restricted_api, False)):
            parsed = [parse_restriction(t, grpc_form) for t in values]
            groups = [g for r in parsed for g in r.groups]  # Triton: a group in one restriction per flag
            if twice := sorted({g for g in groups if groups.count(g) > 1}):
                flag = "--grpc-restricted-protocol" if grpc_form else "--http-restricted-api"
                raise InvalidArgument(f"{flag}: groups {twice} are in more than one restriction")
            restrictions += parsed
        path = config.auth_config_path
        if path is None and not restrictions and audit is None:
            return None
        if path is None:
            return cls(open_policy(restrictions), audit=audit, sample_rate=config.audit_sample_rate)
        return cls(
            read_policy(path, restrictions),
            audit=audit,
            sample_rate=config.audit_sample_rate,
            load=lambda: read_policy(path, restrictions),
            watch=path,
            poll_s=config.auth_poll_s,
        )

    # -- registration ----------------------------------------------------------------------------------------

    def registrar(self, server: Any) -> Registrar:
        """What to register services on instead of ``server``: the same methods, each guarded."""
        return Registrar(self, server)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """``handler`` with its behaviour guarded by ``method``'s rule (or refused to all when it has none)."""
        field = _FIELDS[int(handler.request_streaming) * 2 + int(handler.response_streaming)]
        behavior = getattr(handler, field)
        rule = RULES.get(method)
        self.methods[method] = rule.scope if rule is not None else None
        if rule is None:
            log.error("%s has no scope in the auth table: it is refused to every caller", method)
            guarded: Callable[..., Any] = refuse_all(method)
        elif inspect.isasyncgenfunction(behavior):
            guarded = self._guard_generator(rule, behavior, handler.request_streaming)
        elif inspect.iscoroutinefunction(behavior):
            guarded = self._guard_coroutine(rule, behavior, handler.request_streaming)
        elif not handler.request_streaming and not handler.response_streaming:
            guarded = self._guard_coroutine(rule, unimplemented_stub(method, behavior), False)
        else:
            raise TypeError(f"{method}: the guard takes async handlers only, got {behavior!r}")
        return handler._replace(**{field: guarded})

    def _guard_coroutine(self, rule: Rule, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        audited = self.audit is not None and (bool(rule.admin) or (rule.sampled and self.sample_rate > 0.0))
        if not (streaming or audited or rule.rewrite or rule.filter):
            return self._guard_unary(rule, behavior)

        async def guarded(request: Any, context: Any) -> Any:
            try:
                caller = self._admit(rule, request, context, streaming)
            except Denied as denied:
                self._refused(rule, None if streaming else request, context, denied)
                await context.abort(denied.code, denied.message)
                return None
            token = _CALLER.set(caller)
            try:
                if streaming:
                    if caller.identity.rate is not None:
                        request = self._paced(caller.identity, request)
                elif rule.rewrite is not None:
                    request = rule.rewrite(self, request)
                reply = await behavior(request, context)
                if rule.filter is not None and reply is not None:
                    reply = rule.filter(self, caller.identity, request, reply)
            except BaseException as err:
                if audited:
                    self._after(rule, caller, request, context, err)
                raise
            finally:
                _CALLER.reset(token)
            if audited:
                self._after(rule, caller, request, context, None)
            return reply

        return guarded

    def _guard_unary(self, rule: Rule, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """The common case, kept short (it runs on every inference call): a unary method with nothing to audit,
        rewrite or filter; an identity that sees every model needs no caller for :meth:`visible`."""
        scope, method = rule.scope, rule.method

        async def guarded(request: Any, context: Any) -> Any:
            try:
                identity = self.policy.identify(context.invocation_metadata(), context)
                if scope not in identity.scopes or identity.rate is not None:
                    self._check(rule, identity, False)
            except Denied as denied:
                self._refused(rule, request, context, denied)
                await context.abort(denied.code, denied.message)
                return None
            if identity.every_model:
                return await behavior(request, context)
            token = _CALLER.set(_Caller(identity, context, method, request))
            try:
                return await behavior(request, context)
            finally:
                _CALLER.reset(token)

        return guarded

    def _guard_generator(self, rule: Rule, behavior: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                caller = self._admit(rule, request, context, streaming)
            except Denied as denied:
                self._refused(rule, None if streaming else request, context, denied)
                await context.abort(denied.code, denied.message)
                return
            _CALLER.set(caller)  # the call's own context (each call runs in a copy); never read after it ends
            if streaming:
                if caller.identity.rate is not None:
                    request = self._paced(caller.identity, request)
            elif rule.rewrite is not None:
                request = rule.rewrite(self, request)
            async for reply in behavior(request, context):
                yield reply

        return guarded

    # -- one call ----------------------------------------------------------------------------------------------

    def _admit(self, rule: Rule, request: Any, context: Any, streaming: bool) -> _Caller:
        identity = self.policy.identify(context.invocation_metadata(), context)
        self._check(rule, identity, streaming)
        return _Caller(identity, context, rule.method, request)

    def _check(self, rule: Rule, identity: Identity, streaming: bool) -> None:
        """The method's scope, then the identity's rate (a request stream is paced instead); raises Denied."""
        if rule.scope not in identity.scopes:
            if identity.anonymous:
                raise Denied(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "no_credential",
                    f"{rule.method} needs a credential: the anonymous caller lacks the scope {rule.scope!r}",
                    identity.name,
                )
            raise Denied(
                grpc.StatusCode.PERMISSION_DENIED,
                "scope",
                f"identity {identity.name!r} lacks the scope {rule.scope!r} for {rule.method}",
                identity.name,
            )
        rate = identity.rate
        if rate is not None and not streaming:
            wait = self._bucket(identity).take()
            if wait > 0.0:
                raise Denied(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "rate",
                    f"identity {identity.name!r} is over its rate limit ({rate.per_second:g}/s, burst "
                    f"{rate.burst:g}): retry in {wait:.3f} s",
                    identity.name,
                )

    def _bucket(self, identity: Identity) -> TokenBucket:
        bucket = self._buckets.get(identity.name)
        rate = identity.rate
        assert rate is not None
        if bucket is None or bucket.per_second != rate.per_second or bucket.burst != rate.burst:
            bucket = self._buckets[identity.name] = TokenBucket(rate.per_second, rate.burst)
        return bucket

    async def _paced(self, identity: Identity, requests: Any) -> AsyncIterator[Any]:
        """A request stream as the handler reads it: with a rate, each request waits for a token (the client is
        held back by flow control meanwhile) instead of failing a stream that may be long-lived."""
        async for request in requests:
            while (wait := self._bucket(identity).take()) > 0.0:
                await asyncio.sleep(wait)
            yield request

    def visible(self, model: str) -> bool:
        """Whether the current call may see ``model`` (outside a guarded call: yes). The repository asks this on
        every lookup by name; a hidden model is audited once per call (``authz_fail``, NOT_FOUND)."""
        caller = _CALLER.get()
        if caller is None or caller.identity.sees(model):
            return True
        if caller.hidden is None:
            caller.hidden = set()
        if model not in caller.hidden:
            caller.hidden.add(model)
            self.failures["model"] += 1
            request = caller.request if hasattr(caller.request, "DESCRIPTOR") else None
            detail = f"model {model!r} is not on identity {caller.identity.name!r}'s list"
            name = caller.identity.name
            context, method = caller.context, caller.method
            self._audit(AUTHZ_FAIL, name, context, method, request, "NOT_FOUND", model=model, detail=detail)
        return False

    def _refused(self, rule: Rule, request: Any, context: Any, denied: Denied) -> None:
        if denied.reason == "rate":
            self.rate_limited[denied.identity] = self.rate_limited.get(denied.identity, 0) + 1
            event = RATE_EXCEEDED
        else:
            self.failures[denied.reason] = self.failures.get(denied.reason, 0) + 1
            event = AUTHN_FAIL if denied.code == grpc.StatusCode.UNAUTHENTICATED else AUTHZ_FAIL
        self._audit(event, denied.identity, context, rule.method, request, denied.code.name, detail=denied.message)

    def _after(self, rule: Rule, caller: _Caller, request: Any, context: Any, err: BaseException | None) -> None:
        if self.audit is None:
            return
        if rule.admin:
            if not changes_state(rule, request):
                return  # reading the trace settings changes nothing
            event = AUTHZ_ADMIN
        elif self.sample_rate > 0.0 and (self.sample_rate >= 1.0 or self._random() < self.sample_rate):
            event = ALLOWED
        else:
            return
        shown = None if rule.method.endswith("StreamInfer") else request
        self._audit(event, caller.identity.name, context, rule.method, shown, code_of(err, context), action=rule.admin)

    def _audit(
        self,
        event: str,
        identity: str,
        context: Any,
        method: str,
        request: Any,
        code: str,
        *,
        model: str | None = None,
        action: str = "",
        detail: str = "",
    ) -> None:
        if self.audit is None:
            return
        found_model, version = model_of(request)
        self.audit.record(
            AuditEvent(
                event,
                identity,
                peer_of(context),
                method,
                found_model if model is None else model,
                version,
                code,
                str(getattr(request, "id", "") or ""),
                trace_id_of(context),
                action,
                detail,
            )
        )

    # -- reloads ---------------------------------------------------------------------------------------------

    async def reload(self, why: str = "SIGHUP") -> bool:
        """Build the rules anew; on success they apply to every call that starts from now on, on failure the old
        ones stay and the log says why. Audited either way (``authz_change``)."""
        if self._load is None:
            return True
        if self._watch is not None:  # this reload reads the file as it is now: the watcher need not again
            self._signature = _signature(self._watch)
        try:
            policy = await asyncio.to_thread(self._load)
        except FerryError as err:
            log.error("auth config not reloaded (%s), the previous rules stay: %s", why, err.message)
            if self.audit is not None:
                self.audit.system(AUTHZ_CHANGE, "auth_reload", "INVALID_ARGUMENT", f"{why}: {err.message}")
            return False
        self.policy = policy
        names = {i.name for i in policy.identities} | {"anonymous"}
        for name in [n for n in self._buckets if n not in names]:
            del self._buckets[name]
        log.info("auth config reloaded (%s): %d identities", why, len(policy.identities))
        if self.audit is not None:
            self.audit.system(AUTHZ_CHANGE, "auth_reload", "OK", why)
        return True

    def start(self) -> None:
        """Watch the auth file for changes (on the running loop)."""
        if self._watch is not None and self._load is not None and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_file(self._watch))

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch_file(self, path: Path) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            now = _signature(path)
            if now != self._signature:
                self._signature = now  # a bad file is reported once, then again only when it changes
                await self.reload("file change")

    # -- metrics ---------------------------------------------------------------------------------------------

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        return dict(self.failures), dict(self.rate_limited)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def metric_families(guard: Guard | None, audit: AuditLog | None) -> Iterator[Metric]:
    """The security families, always present (empty without auth or audit log)."""
    failures = CounterMetricFamily(
        "ferry_auth_failures", "Calls refused before their handler, by reason.", labels=["reason"]
    )
    limited = CounterMetricFamily(
        "ferry_auth_rate_limited", "Calls refused over their identity's rate limit.", labels=["identity"]
    )
    if guard is not None:
        counted, rated = guard.counts()
        for reason, count in sorted(counted.items()):
            failures.add_metric([reason], count)
        for identity, count in sorted(rated.items()):
            limited.add_metric([identity], count)
    written = CounterMetricFamily("ferry_audit_written", "Audit events written to the audit log.")
    dropped = CounterMetricFamily("ferry_audit_dropped", "Audit events dropped: the writer's queue was full.")
    if audit is not None:
        written.add_metric([], audit.written)
        dropped.add_metric([], audit.dropped)
    yield from (failures, limited, written, dropped)


__all__ = ["Guard", "metric_families"]

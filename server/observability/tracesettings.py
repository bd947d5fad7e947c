"""Trace settings that change while the server runs: Triton's trace extension (the ``TraceSetting`` RPC, which
tritonclient's ``update_trace_settings`` / ``get_trace_settings`` call) over Ferry's OpenTelemetry tracing.

Keys, each a list of strings on the wire as in Triton:

- ``trace_level``: ``OFF`` or ``TIMESTAMPS`` (Ferry's spans are the timestamps of each stage; ``TENSORS`` is
  refused).
- ``trace_rate``: ``N`` samples a request with probability 1/N. Triton samples every N-th request; Ferry keeps
  OpenTelemetry's trace-id ratio, so that services sampling the same trace by ratio agree. ``0``: no request that
  starts a trace is sampled.
- ``trace_count``: ``-1`` (no limit) or how many more requests to sample; it counts down and sampling stops at 0.
  ``TraceSetting`` calls themselves never count: reading a model's settings leaves its count as it was.
- ``trace_mode``: ``opentelemetry``, read-only.

Startup values come from the provider's sampler (``OTEL_TRACES_SAMPLER`` / ``_ARG``): ``traceidratio`` 0.1 reads as
level TIMESTAMPS, rate 10; ``always_off`` as level OFF; the ``parentbased_*`` samplers keep following the sampled
flag of a caller's ``traceparent``. A model's settings override the global ones key by key (and apply to RPCs that
name the model); an update that sends a key with no value drops the model's override, or, globally, restores the
startup value.

Deciding is Ferry's: for the SDK's own samplers the decision is the one the sampler would make (a unit test holds
them to it), without the call, its result object and its context lookup (~3 µs of the ~4 an unsampled request cost).
Any other sampler is still called for every request, and ``trace_rate`` cannot be changed until it is replaced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from ferry.client.errors import FailedPrecondition, InvalidArgument

LEVELS = ("OFF", "TIMESTAMPS")
MODE = "opentelemetry"
TRITON_ONLY = ("trace_file", "log_frequency")
"""Settings of Triton's own trace files, which Ferry does not write (it exports spans: OTEL_TRACES_EXPORTER)."""
SETTINGS = {"trace_level": "level", "trace_rate": "ratio", "trace_count": "count"}
"""The settings that can change, by the attribute of a scope that holds each (``trace_mode`` is read-only)."""
UNCOUNTED = frozenset({"TraceSetting"})
"""RPC methods traced without counting down ``trace_count``: reading or changing the settings must not change them."""
OFF_RATIO = 0.001
"""The ratio a server that started with tracing off samples at once its level is raised (Triton's rate 1000)."""


class _Scope:
    """Global settings (every field set, but ``ratio`` when an unknown sampler decides) or one model's overrides
    (None: the global value)."""

    __slots__ = ("count", "level", "ratio")

    def __init__(self, level: str | None = None, ratio: float | None = None, count: int | None = None) -> None:
        self.level: str | None = level
        self.ratio: float | None = ratio
        self.count: int | None = count


class Policy:
    """The settings in force for one scope, resolved for the request path: the level is not OFF (``on``), the bound
    a trace id's low 64 bits must stay under (None: ask the provider's sampler), and the scope whose ``count``
    counts down (shared by every model that does not set its own): nothing is sampled while it is 0."""

    __slots__ = ("bound", "counter", "on", "parent_based")

    def __init__(self, on: bool, bound: int | None, parent_based: bool, counter: _Scope) -> None:
        self.on, self.bound, self.parent_based, self.counter = on, bound, parent_based, counter

    def took(self, method: str = "") -> None:
        """One call of ``method`` was sampled: count it down (at 0 nothing more is sampled), unless the method is
        one of :data:`UNCOUNTED`."""
        if method in UNCOUNTED:
            return
        counter = self.counter
        if counter.count is not None and counter.count > 0:
            counter.count -= 1


class TraceSettings:
    """The global settings, each model's overrides, and the :class:`Policy` each resolves to (recomputed on every
    update, so the request path only looks one up)."""

    def __init__(self, level: str, ratio: float | None, parent_based: bool, can_trace: bool) -> None:
        self.parent_based = parent_based
        self.can_trace = can_trace
        self._startup = (level, ratio)
        self._global = _Scope(level, ratio, -1)
        self._models: dict[str, _Scope] = {}
        self._policies: dict[str, Policy] = {}
        self.default = self._resolve(None)

    @classmethod
    def from_sampler(cls, sampler: Sampler | None) -> TraceSettings:
        """The settings a sampler amounts to (None: tracing has no exporter, and stays off)."""
        if sampler is None:
            return cls("OFF", OFF_RATIO, False, can_trace=False)
        parent_based = False
        if isinstance(sampler, ParentBased) and type(sampler) in (ParentBased, ParentBasedTraceIdRatio):
            # ParentBased's parts are private attributes (long stable); only its default parent rules are known
            if sampler._remote_parent_sampled is not ALWAYS_ON or sampler._remote_parent_not_sampled is not ALWAYS_OFF:
                return cls("TIMESTAMPS", None, False, can_trace=True)
            sampler, parent_based = sampler._root, True
        if type(sampler) is TraceIdRatioBased:
            return cls("TIMESTAMPS", sampler.rate, parent_based, can_trace=True)
        if sampler is ALWAYS_ON:
            return cls("TIMESTAMPS", 1.0, parent_based, can_trace=True)
        if sampler is ALWAYS_OFF:  # parent-based: only what the caller sampled; else nothing
            return cls("TIMESTAMPS", 0.0, True, can_trace=True) if parent_based else cls("OFF", OFF_RATIO, False, True)
        return cls("TIMESTAMPS", None, False, can_trace=True)

    def policy(self, model: str) -> Policy:
        """The policy for a request naming ``model`` (empty: none)."""
        if self._policies and model:
            return self._policies.get(model, self.default)
        return self.default

    def _in_force(self, model: str | None) -> tuple[str, float | None, int, _Scope]:
        """Level, ratio and count in force for ``model`` (its own value of each, else the global one), and the scope
        whose count is the one that counts down."""
        own = (self._models.get(model) if model else None) or _Scope()
        level = own.level if own.level is not None else self._global.level
        ratio = own.ratio if own.ratio is not None else self._global.ratio
        counter = own if own.count is not None else self._global
        assert level is not None and counter.count is not None  # the global scope has every value
        return level, ratio, counter.count, counter

    def _resolve(self, model: str | None) -> Policy:
        level, ratio, _, counter = self._in_force(model)
        bound = None if ratio is None else TraceIdRatioBased.get_bound_for_rate(ratio)
        return Policy(level != "OFF", bound, self.parent_based, counter)

    def get(self, model: str | None = None) -> dict[str, list[str]]:
        """The settings in force for ``model`` (None: the global ones), as the RPC reports them."""
        level, ratio, count, _ = self._in_force(model)
        out = {"trace_level": [level], "trace_count": [str(count)], "trace_mode": [MODE]}
        if ratio is not None:
            out["trace_rate"] = [str(round(1 / ratio)) if ratio else "0"]
        return out

    def update(self, model: str | None, changes: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Apply ``changes`` (all of them, or none when one is invalid) to ``model``'s settings (None: the global
        ones); returns the settings now in force there."""
        parsed = {name: _parse(name, list(values)) for name, values in changes.items()}
        if parsed.get("trace_level") not in (None, "OFF") and not self.can_trace:
            raise FailedPrecondition("tracing has no exporter: start Ferry with OTEL_TRACES_EXPORTER=otlp (or console)")
        scope = self._models.setdefault(model, _Scope()) if model else self._global
        startup_level, startup_ratio = self._startup
        for name, value in parsed.items():
            attr = SETTINGS.get(name)
            if attr is None:  # trace_mode: nothing to change
                continue
            if value is None and not model:  # a global key with no value: back to its startup value
                value = {"level": startup_level, "ratio": startup_ratio, "count": -1}[attr]
            setattr(scope, attr, value)
        if model and scope.level is None and scope.ratio is None and scope.count is None:
            del self._models[model]
        self.default = self._resolve(None)
        self._policies = {name: self._resolve(name) for name in self._models}
        return self.get(model)


def _parse(name: str, values: list[str]) -> object:
    """One setting's value (None: no value, i.e. drop it); INVALID_ARGUMENT with the reason when it is not valid."""
    if name in TRITON_ONLY:
        raise InvalidArgument(
            f"trace setting {name!r} belongs to Triton's trace files; Ferry exports OpenTelemetry spans "
            "(OTEL_TRACES_EXPORTER, OTEL_EXPORTER_OTLP_ENDPOINT)"
        )
    if name not in SETTINGS and name != "trace_mode":
        raise InvalidArgument(f"unknown trace setting {name!r}: trace_level, trace_rate, trace_count or trace_mode")
    if not values:
        return None
    if name == "trace_level":
        if unknown := [v for v in values if v not in LEVELS]:
            raise InvalidArgument(f"trace_level {unknown} is not supported: OFF or TIMESTAMPS (Ferry records stages)")
        return "TIMESTAMPS" if "TIMESTAMPS" in values else "OFF"
    if name == "trace_mode":
        if values != [MODE]:
            raise InvalidArgument(f"trace_mode is {MODE!r} and cannot be changed, got {values}")
        return MODE
    if len(values) != 1:
        raise InvalidArgument(f"{name} takes one value, got {values}")
    try:
        number = int(values[0])
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {values[0]!r}") from None
    if name == "trace_rate":
        if number < 0:
            raise InvalidArgument(f"trace_rate must be >= 0 (1 of every N requests; 0 = none), got {number}")
        return 1.0 / number if number else 0.0
    if number < -1:
        raise InvalidArgument(f"trace_count must be -1 (no limit) or >= 0, got {number}")
    return number

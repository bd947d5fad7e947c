"""Trace sampling decided by Ferry's trace settings (:mod:`ferry.server.observability.tracesettings`): for every
sampler the ``OTEL_TRACES_SAMPLER`` variable can name, the decision must be the SDK sampler's own, with and without a
caller's
trace; other samplers are still called; and the settings change as Triton's TraceSetting RPC says."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState, set_span_in_context

from ferry.client.errors import FailedPrecondition, InvalidArgument
from ferry.server.observability.telemetry import SERVICE, Tracing
from ferry.server.observability.tracesettings import TraceSettings

PARENT_SPAN_ID = 0xB7AD6B7169203331


class Replay(IdGenerator):
    """Trace ids from a list (to ask the sampler about the same ids), span ids counting up."""

    def __init__(self, trace_ids: list[int]) -> None:
        self.trace_ids: Iterator[int] = iter(trace_ids)
        self.span_id = 0

    def generate_trace_id(self) -> int:
        return next(self.trace_ids)

    def generate_span_id(self) -> int:
        self.span_id += 1
        return self.span_id


class EvenOnly(Sampler):
    """A sampler of someone's own: keeps even trace ids."""

    def __init__(self) -> None:
        self.calls = 0

    def should_sample(self, parent_context: Any, trace_id: int, *args: Any, **kw: Any) -> SamplingResult:
        self.calls += 1
        return SamplingResult(Decision.RECORD_AND_SAMPLE if trace_id % 2 == 0 else Decision.DROP)

    def get_description(self) -> str:
        return "EvenOnly"


SAMPLERS = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
    "traceidratio 0.3": TraceIdRatioBased(0.3),
    "parentbased_traceidratio 0.1": ParentBasedTraceIdRatio(0.1),
    "ParentBased(TraceIdRatioBased(0.5))": ParentBased(TraceIdRatioBased(0.5)),
}


def trace_ids(sampler: Sampler) -> list[int]:
    rng = random.Random(7)
    ids = [rng.getrandbits(128) | 1 for _ in range(1500)]
    bound = TraceSettings.from_sampler(sampler).default.bound
    assert bound is not None  # decided without the call
    # edges of the low 64 bits the ratio compares: both sides of the bound, the largest, and high bits set
    return [*ids, (5 << 64) | max(bound - 1, 1), (5 << 64) | min(bound, (1 << 64) - 1), (1 << 64) - 1, 0x1234 << 64]


@pytest.mark.parametrize("name", SAMPLERS)
def test_parentless_requests_are_sampled_as_the_sdk_sampler_decides(name: str) -> None:
    sampler = SAMPLERS[name]
    ids = trace_ids(sampler)
    tracing = Tracing(TracerProvider(sampler=sampler, id_generator=Replay(ids)))
    expected = [sampler.should_sample(None, t, "x").decision.is_sampled() for t in ids]
    spans = [tracing.rpc_span(SERVICE, "ModelInfer", ()) for _ in ids]
    assert [s is not None for s in spans] == expected
    for trace_id, span in zip(ids, spans, strict=True):
        if span is not None:
            assert span.context.trace_id == trace_id and span.parent is None and span.context.trace_flags.sampled
            assert span.attributes == {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "ModelInfer"}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("caller_sampled", [True, False])
def test_requests_continuing_a_callers_trace_are_sampled_as_the_sdk_sampler_decides(
    name: str, caller_sampled: bool
) -> None:
    sampler = SAMPLERS[name]
    tracing = Tracing(TracerProvider(sampler=sampler))
    flags = "01" if caller_sampled else "00"
    for trace_id in trace_ids(sampler)[:300]:
        traceparent = f"00-{trace_id:032x}-{PARENT_SPAN_ID:016x}-{flags}"
        span = tracing.rpc_span(SERVICE, "ModelInfer", (("traceparent", traceparent), ("tracestate", "k=v")))
        parent = SpanContext(
            trace_id, PARENT_SPAN_ID, True, TraceFlags(int(flags, 16)), TraceState([("k", "v")])
        )  # fmt: skip
        expected = sampler.should_sample(set_span_in_context(NonRecordingSpan(parent)), trace_id, "x")
        assert (span is not None) == expected.decision.is_sampled(), trace_id
        if span is not None:
            assert span.parent == parent and span.context.trace_id == trace_id
            assert span.context.trace_state == expected.trace_state == parent.trace_state


def test_other_samplers_are_called() -> None:
    sampler = EvenOnly()
    for custom in (sampler, ParentBased(sampler), ParentBased(ALWAYS_ON, remote_parent_not_sampled=ALWAYS_ON)):
        assert TraceSettings.from_sampler(custom).default.bound is None
    tracing = Tracing(TracerProvider(sampler=sampler, id_generator=Replay(list(range(10, 20)))))
    kept = [tracing.rpc_span(SERVICE, "ModelInfer", ()) is not None for _ in range(10)]
    assert kept == [i % 2 == 0 for i in range(10, 20)] and sampler.calls == 10
    assert "trace_rate" not in tracing.settings.get()  # the sampler's own rule: no rate to report


def sampled(tracing: Tracing, n: int, model: str = "") -> int:
    return sum(tracing.rpc_span(SERVICE, "ModelInfer", (), model) is not None for _ in range(n))


def test_settings_read_from_the_sampler_and_changed_at_run_time() -> None:
    tracing = Tracing(TracerProvider(sampler=ParentBasedTraceIdRatio(0.1)))
    settings = tracing.settings
    assert settings.get() == {
        "trace_level": ["TIMESTAMPS"], "trace_rate": ["10"], "trace_count": ["-1"], "trace_mode": ["opentelemetry"]
    }  # fmt: skip
    assert settings.update(None, {"trace_rate": ["1"]})["trace_rate"] == ["1"]
    assert sampled(tracing, 50) == 50
    settings.update(None, {"trace_level": ["OFF"]})
    assert sampled(tracing, 50) == 0
    settings.update(None, {"trace_level": ["TIMESTAMPS"], "trace_count": ["3"]})
    assert sampled(tracing, 50) == 3 and settings.get()["trace_count"] == ["0"]
    # a model's own settings: its rate, its own count; other models keep the global ones (count 0: nothing)
    assert settings.update("mlp", {"trace_count": ["5"], "trace_rate": ["1"]})["trace_count"] == ["5"]
    assert sampled(tracing, 20, "mlp") == 5 and sampled(tracing, 20, "tiny") == 0 and sampled(tracing, 20) == 0
    settings.update(None, {"trace_count": []})  # no value: the startup value (no limit)
    assert sampled(tracing, 20, "tiny") > 0 and sampled(tracing, 20, "mlp") == 0  # mlp's own count is spent
    settings.update("mlp", {"trace_count": [], "trace_rate": []})  # drop mlp's overrides: global again
    assert settings.get("mlp") == settings.get() and settings.get()["trace_rate"] == ["1"]
    settings.update(None, {"trace_rate": [], "trace_level": []})
    assert settings.get()["trace_rate"] == ["10"] and settings.get()["trace_level"] == ["TIMESTAMPS"]
    settings.update(None, {"trace_rate": ["0"]})  # parent-based: only what a caller sampled
    assert sampled(tracing, 100) == 0 and settings.get()["trace_rate"] == ["0"]


def test_trace_setting_calls_do_not_count_down_trace_count() -> None:
    """Reading a model's settings (a TraceSetting call naming it) is traced by its settings but never spends its
    count: a read after setting 5 reads 5, and 5 inference requests are still sampled."""
    tracing = Tracing(TracerProvider(sampler=ALWAYS_ON))
    tracing.settings.update("mlp", {"trace_count": ["5"]})
    tracing.settings.update(None, {"trace_count": ["2"]})
    for model in ("mlp", "mlp", "", ""):
        assert tracing.rpc_span(SERVICE, "TraceSetting", (), model) is not None
    assert tracing.settings.get("mlp")["trace_count"] == ["5"] and tracing.settings.get()["trace_count"] == ["2"]
    assert sampled(tracing, 10, "mlp") == 5 and sampled(tracing, 10) == 2
    assert tracing.settings.get("mlp")["trace_count"] == ["0"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"trace_level": ["TENSORS"]}, "OFF or TIMESTAMPS"),
        ({"trace_rate": ["ten"]}, "must be an integer"),
        ({"trace_rate": ["-1"]}, "must be >= 0"),
        ({"trace_rate": ["1", "2"]}, "takes one value"),
        ({"trace_count": ["-2"]}, "-1 (no limit) or >= 0"),
        ({"trace_file": ["/tmp/t.json"]}, "Triton's trace files"),
        ({"log_frequency": ["5"]}, "Triton's trace files"),
        ({"trace_mode": ["triton"]}, "cannot be changed"),
        ({"sampling": ["1"]}, "unknown trace setting 'sampling'"),
        ({"trace_rate": ["1"], "trace_level": ["TENSORS"]}, "OFF or TIMESTAMPS"),  # nothing applied
    ],
)
def test_invalid_changes_are_refused_whole(changes: dict[str, list[str]], message: str) -> None:
    settings = Tracing(TracerProvider(sampler=TraceIdRatioBased(0.5))).settings
    before = settings.get()
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings.update(None, changes)
    assert settings.get() == before


def test_without_an_exporter_the_level_stays_off() -> None:
    settings = Tracing(None).settings
    assert settings.get()["trace_level"] == ["OFF"]
    with pytest.raises(FailedPrecondition, match="OTEL_TRACES_EXPORTER"):
        settings.update(None, {"trace_level": ["TIMESTAMPS"]})
    assert settings.update(None, {"trace_rate": ["100"]})["trace_rate"] == ["100"]

"""One measured step: what was asked (closed loop at a concurrency, or open loop at a rate) and what came back.

:func:`summarize` merges the workers' tallies (histograms add bucket by bucket) into a :class:`StepResult`, the
row every report is made of.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ferry.loadtest.histogram import Histogram

PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)


def pct_key(q: float) -> str:
    return f"p{q:g}"


@dataclass(frozen=True, slots=True)
class StepSpec:
    loop: str  # "closed" | "open"
    concurrency: int = 0
    rate: float = 0.0
    poisson: bool = False
    phase: str = "sweep"  # "sweep" | "probe" | "capacity"

    def label(self) -> str:
        if self.loop == "closed":
            return f"concurrency {self.concurrency}"
        return f"{'poisson' if self.poisson else 'constant'} {self.rate:g}/s"


@dataclass(slots=True)
class StepResult:
    index: int
    phase: str
    loop: str
    mode: str
    concurrency: int | None
    offered_rps: float | None
    poisson: bool
    window_s: float
    requests: int  # intended in the window
    ok: int  # of those, answered successfully
    throughput_rps: float  # successful answers arriving in the window, per second
    rows_per_s: float
    latency_ms: dict[str, float]
    service_ms: dict[str, float]
    send_lag_ms: dict[str, float]
    errors: dict[str, int]
    error_rate: float
    drift: float | None  # mean latency, second half of the window / first half
    capped: bool
    sent: int
    server: dict[str, Any] | None = None
    stable: bool | None = None
    unstable_because: list[str] = field(default_factory=list)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms["p99"]

    @property
    def x_rate(self) -> float:
        """Offered rate for an open-loop step, achieved throughput for a closed-loop one."""
        return self.offered_rps if self.offered_rps is not None else self.throughput_rps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        return cls(**data)


def latency_summary(h: Histogram, scale: float = 1e-6) -> dict[str, float]:
    out = {pct_key(q): round(h.percentile(q) * scale, 4) for q in PERCENTILES}
    out["max"] = round(h.max * scale, 4)
    out["mean"] = round(h.mean * scale, 4)
    return out


def summarize(
    index: int,
    spec: StepSpec,
    mode: str,
    tallies: Sequence[Mapping[str, Any]],
    duration_s: float,
    server: dict[str, Any] | None,
) -> StepResult:
    """Merge workers' tallies (``generator.Tally.to_dict``) of one step."""
    latency = Histogram.merged(Histogram.from_dict(t["latency"]) for t in tallies)
    service = Histogram.merged(Histogram.from_dict(t["service"]) for t in tallies)
    lag = Histogram.merged(Histogram.from_dict(t["lag"]) for t in tallies)
    errors: Counter[str] = Counter()
    for t in tallies:
        errors.update(t["errors"])
    caps = [t["capped_at_s"] for t in tallies if t["capped_at_s"] is not None]
    # when the request cap stopped sending early, throughput is over the part of the window that had load
    window_s = min([duration_s, *caps]) if caps else duration_s
    window_s = max(window_s, 1e-3)
    requests = sum(t["in_window"] for t in tallies)
    half = [sum(t["half_ns"][i] for t in tallies) for i in range(4)]
    drift = (half[2] / half[3]) / (half[0] / half[1]) if half[1] and half[3] and half[0] else None
    failed = sum(errors.values())
    return StepResult(
        index=index,
        phase=spec.phase,
        loop=spec.loop,
        mode=mode,
        concurrency=spec.concurrency if spec.loop == "closed" else None,
        offered_rps=spec.rate if spec.loop == "open" else None,
        poisson=spec.poisson,
        window_s=round(window_s, 4),
        requests=requests,
        ok=requests - failed,
        throughput_rps=round(sum(t["ok_arrived"] for t in tallies) / window_s, 2),
        rows_per_s=round(sum(t["rows_arrived"] for t in tallies) / window_s, 2),
        latency_ms=latency_summary(latency),
        service_ms=latency_summary(service),
        send_lag_ms=latency_summary(lag),
        errors=dict(sorted(errors.items())),
        error_rate=round(failed / requests, 6) if requests else 0.0,
        drift=round(drift, 3) if drift is not None else None,
        capped=bool(caps),
        sent=sum(t["sent"] for t in tallies),
        server=server,
    )

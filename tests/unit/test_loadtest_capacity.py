"""Capacity search, knee and replica plan against simulated servers whose latency curves are known exactly."""

from __future__ import annotations

import math

import pytest

from ferry.loadtest.capacity import judge, knee, plan, search
from ferry.loadtest.steps import StepResult

DURATION_S = 10.0


def step(rate: float, p99_ms: float, throughput: float | None = None, errors: int = 0) -> StepResult:
    """A measured open-loop step as the runner would report it."""
    requests = int(rate * DURATION_S)
    throughput = rate if throughput is None else throughput
    lat = {"p50": p99_ms / 4, "p90": p99_ms / 2, "p95": p99_ms / 1.5, "p99": p99_ms, "p99.9": p99_ms * 1.5,
           "max": p99_ms * 2, "mean": p99_ms / 3}  # fmt: skip
    return StepResult(
        index=0, phase="capacity", loop="open", mode="unary", concurrency=None, offered_rps=rate, poisson=True,
        window_s=DURATION_S, requests=requests, ok=requests - errors, throughput_rps=throughput,
        rows_per_s=throughput, latency_ms=lat, service_ms=lat, send_lag_ms=dict.fromkeys(lat, 0.0),
        errors={"UNAVAILABLE": errors} if errors else {}, error_rate=errors / requests if requests else 0.0,
        drift=1.0, capped=False, sent=requests,
    )  # fmt: skip


class MM1:
    """A fake server: one M/M/1 queue of service rate ``mu`` behind ``base_ms`` of fixed latency. Response time is
    exponential with rate ``mu - λ``, so p99 = base + ln(100) / (mu - λ); at λ >= mu the queue grows without bound
    (answers arrive at ``mu``, latency grows with the window)."""

    def __init__(self, mu: float, base_ms: float = 0.5) -> None:
        self.mu, self.base_ms = mu, base_ms
        self.rates: list[float] = []

    def p99_ms(self, rate: float) -> float:
        return self.base_ms + 1e3 * math.log(100) / (self.mu - rate)

    def capacity(self, slo_ms: float) -> float:
        """The highest λ with p99 <= slo: the knee the search must find."""
        return self.mu - 1e3 * math.log(100) / (slo_ms - self.base_ms)

    def measure(self, rate: float) -> StepResult:
        self.rates.append(rate)
        if rate >= self.mu:
            backlog_s = (rate - self.mu) / rate * DURATION_S
            return step(rate, 1e3 * backlog_s + self.p99_ms(0.99 * self.mu), throughput=self.mu)
        return step(rate, self.p99_ms(rate))


@pytest.mark.parametrize("start", [10.0, 700.0, 950.0, 5000.0])
@pytest.mark.parametrize("slo_ms", [20.0, 50.0, 200.0])
def test_search_finds_the_known_capacity_within_5_percent(start: float, slo_ms: float) -> None:
    server = MM1(mu=1000.0)
    truth = server.capacity(slo_ms)
    result = search(server.measure, start, slo_ms, 0.001, tolerance=0.03, max_steps=20)
    assert result.converged
    assert result.capacity_rps is not None
    assert result.capacity_rps <= truth  # only a rate measured stable is reported
    assert result.capacity_rps >= 0.95 * truth
    assert result.upper_rps is not None and result.upper_rps > truth
    assert len(result.steps) == len(server.rates) <= 20
    assert all(s.stable == (s.offered_rps is not None and s.offered_rps <= truth) for s in result.steps)


def test_search_rechecks_a_lucky_pass_and_searches_below_it() -> None:
    server = MM1(mu=1000.0)
    truth = server.capacity(50.0)
    lucky: set[float] = set()

    def noisy(rate: float) -> StepResult:
        if truth < rate < 1.2 * truth and not lucky:  # the first unstable rate passes once, by luck
            lucky.add(rate)
            return step(rate, 10.0)
        return server.measure(rate)

    result = search(noisy, 800.0, 50.0, tolerance=0.03, max_steps=20)
    assert lucky, "the simulation never offered the lucky pass"
    assert result.capacity_rps is not None and 0.95 * truth <= result.capacity_rps <= truth
    assert [s.offered_rps for s in result.steps].count(next(iter(lucky))) == 2  # measured again, and failed


def test_a_failed_recheck_never_measures_the_same_rate_again_even_when_rates_are_rounded() -> None:
    server = MM1(mu=1000.0)
    truth = server.capacity(50.0)
    failed_once: set[float] = set()

    def flaky(rate: float) -> StepResult:  # every stable rate fails its second measurement once
        rate = round(rate, 1)  # as the CLI records it
        result = server.measure(rate)
        if rate <= truth and rate in failed_once:
            return step(rate, 500.0)
        failed_once.add(rate)
        return result

    result = search(flaky, 700.0, 50.0, tolerance=0.03, max_steps=30)
    rates = [s.offered_rps for s in result.steps]
    assert max(rates.count(r) for r in rates) <= 2
    assert result.capacity_rps is None or result.capacity_rps <= truth


def test_search_respects_its_step_cap_and_reports_unreachable_slos() -> None:
    server = MM1(mu=1000.0)
    capped = search(server.measure, 10.0, 50.0, tolerance=0.001, max_steps=4)
    assert len(capped.steps) == 4 and not capped.converged and "4 steps" in capped.note
    hopeless = search(MM1(mu=1000.0, base_ms=30.0).measure, 500.0, 20.0, max_steps=30)
    assert hopeless.capacity_rps is None and "unstable even at" in hopeless.note


def test_search_stops_at_the_rate_bound() -> None:
    result = search(MM1(mu=1e9).measure, 1000.0, 50.0, max_rps=5000.0)
    assert result.capacity_rps == 5000.0 and result.converged and "max-rps" in result.note


def test_judge_names_every_reason() -> None:
    ok, reasons = judge(step(100, 5.0), 10.0, 0.001)
    assert ok and reasons == []
    ok, reasons = judge(step(100, 50.0, throughput=80.0, errors=10), 10.0, 0.001)
    assert not ok
    assert any("SLO" in r for r in reasons) and any("error rate" in r for r in reasons)
    assert any("falling behind" in r for r in reasons)
    assert judge(step(100, 50.0), None, 0.001)[0]  # no SLO: only errors and keeping up count


class HockeyStick:
    """A server whose p99 is flat (2 ms, creeping up 1 µs per request/s) until ``knee_rps``, then rises 0.5 ms per
    request/s: the knee is known exactly."""

    def __init__(self, knee_rps: float) -> None:
        self.knee_rps = knee_rps

    def p99_ms(self, rate: float) -> float:
        return 2.0 + 0.001 * rate + max(0.0, rate - self.knee_rps) * 0.5

    def measure(self, rate: float) -> StepResult:
        return step(rate, self.p99_ms(rate))


@pytest.mark.parametrize("true_knee", [450.0, 1200.0, 1730.0])
def test_knee_of_a_sweep_is_within_5_percent(true_knee: float) -> None:
    server = HockeyStick(true_knee)
    rates = [100.0 * k for k in range(1, 26)]
    found = knee([(r, server.p99_ms(r)) for r in rates])
    assert found is not None
    assert abs(found[0] - true_knee) <= 0.05 * true_knee


def test_knee_of_the_capacity_search_is_within_5_percent() -> None:
    server = HockeyStick(1200.0)
    result = search(server.measure, 300.0, 20.0, tolerance=0.02, max_steps=20)
    found = knee([(s.offered_rps or 0.0, s.p99_ms) for s in result.steps])
    assert found is not None and abs(found[0] - 1200.0) <= 0.05 * 1200.0
    assert result.capacity_rps is not None and result.capacity_rps <= 1200 + 18 / 0.5 + 1e-6


def test_knee_needs_a_curve() -> None:
    assert knee([(1, 1), (2, 2)]) is None
    assert knee([(1, 5), (2, 5), (3, 5)]) is None  # flat


def test_plan_divides_the_peak_by_usable_capacity() -> None:
    p = plan(1000.0, 4500.0, 0.3)
    assert p["usable_per_replica_rps"] == 700.0
    assert p["replicas"] == 7  # 4500 / 700 = 6.43
    assert p["replicas_n_plus_1"] == 8
    assert p["utilisation_at_peak"] == pytest.approx(4500 / 7000, abs=1e-3)
    assert plan(1000.0, 700.0, 0.3)["replicas"] == 1  # exactly at the usable rate: one is enough
    assert plan(1000.0, 10.0, 0.0)["replicas"] == 1
    with pytest.raises(ValueError):
        plan(1000.0, 10.0, 1.0)
    with pytest.raises(ValueError):
        plan(0.0, 10.0, 0.2)

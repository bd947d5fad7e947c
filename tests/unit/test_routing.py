"""Parsing and choosing of version labels, the traffic split and the shadow (models/routing.py); the shadow's
comparison (inference/shadow.py) and its prediction-log entry."""

from __future__ import annotations

import asyncio
import json
import types
from collections import Counter

import numpy as np
import pytest

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import Internal, InvalidArgument
from ferry.server.inference.shadow import TRICKLE_S, OutputAgreement, ShadowRunner, compare
from ferry.server.models.routing import DEFAULT_SHADOW_MAX_IN_FLIGHT, Routing, Shadow, parse_routing
from ferry.server.observability.predlog import Prediction, PredictionLogOptions, ShadowPrediction, encode_prediction
from ferry.server.observability.stats import VersionStats


def routing(**parameters: str) -> Routing | None:
    config = mc.ModelConfig(name="m")
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return parse_routing(config, "m")


def parsed(**parameters: str) -> Routing:
    found = routing(**parameters)
    assert found is not None
    return found


def test_no_routing_parameters_is_no_routing() -> None:
    assert routing() is None
    assert routing(prediction_log_rate="1") is None


def test_labels_split_and_shadow_parse() -> None:
    r = parsed(
        version_labels=" stable = 3 , canary=4",
        traffic_split="stable=90,4=10,5=0",
        shadow="version=canary,fraction=0.25",
    )
    assert dict(r.labels) == {"stable": 3, "canary": 4}
    assert r.split == ((3, 90), (4, 10))  # a weight of 0 sends nothing, but its version must still load
    assert r.shadow == Shadow(4, 0.25, DEFAULT_SHADOW_MAX_IN_FLIGHT)
    assert sorted({v for v, _ in r.named}) == [3, 4, 5]
    assert parsed(shadow="version=2,fraction=1,max_in_flight=3").shadow == Shadow(2, 1.0, 3)


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"version_labels": "stable"}, "version_labels: expected key=value items separated by commas, got 'stable'"),
        ({"version_labels": "stable=3,"}, "expected key=value items separated by commas, got ''"),
        ({"version_labels": "7=3"}, "version_labels entry 7=3: a label is a letter or '_'"),
        ({"version_labels": "can ary=3"}, "a label is a letter or '_' then up to 62"),
        ({"version_labels": "stable=3,stable=4"}, "version_labels: 'stable' appears twice"),
        ({"version_labels": "stable=0"}, "version_labels entry stable=0: a version is a positive integer"),
        ({"version_labels": "stable=x"}, "a version is a positive integer (or a declared label), got 'x'"),
        ({"traffic_split": "3=90,4=ten"}, "traffic_split entry 4=ten: a weight is an integer in 0..1000000, got 'ten'"),
        ({"traffic_split": "3=-1"}, "a weight is an integer in 0..1000000, got '-1'"),
        ({"traffic_split": "3=0,4=0"}, "traffic_split must give some version a weight above 0"),
        ({"traffic_split": ""}, "traffic_split must give some version a weight above 0"),
        ({"traffic_split": "canary=1"}, "traffic_split entry canary=1: a version is a positive integer"),
        (
            {"version_labels": "a=3", "traffic_split": "a=1,3=1"},
            "traffic_split names version 3 twice",
        ),
        ({"shadow": "version=2"}, "shadow 'version=2': missing fraction"),
        ({"shadow": "fraction=0.5"}, "missing version"),
        ({"shadow": "version=2,fraction=0"}, "fraction must be a number in (0, 1], got '0'"),
        ({"shadow": "version=2,fraction=1.5"}, "fraction must be a number in (0, 1], got '1.5'"),
        ({"shadow": "version=2,fraction=nan"}, "fraction must be a number in (0, 1], got 'nan'"),
        (
            {"shadow": "version=2,fraction=0.1,rate=2"},
            "unknown keys ['rate'] (known: version, fraction, max_in_flight)",
        ),
        ({"shadow": "version=2,fraction=0.1,max_in_flight=0"}, "max_in_flight must be an integer in 1..1024"),
        ({"shadow": "version=2,fraction=0.1,max_in_flight=5000"}, "max_in_flight must be an integer in 1..1024"),
    ],
)
def test_malformed_entries_are_refused_precisely(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        routing(**parameters)
    assert "model 'm' parameters: " in str(caught.value)
    assert message in str(caught.value)


def test_check_names_the_first_version_that_is_not_loaded() -> None:
    r = parsed(version_labels="stable=3", traffic_split="3=1,4=1", shadow="version=5,fraction=0.5")
    r.check("m", {3, 4, 5})
    with pytest.raises(InvalidArgument, match=r"traffic_split \(4=1\) names version 4, which is not loaded"):
        r.check("m", {3, 5})
    with pytest.raises(InvalidArgument, match=r"shadow \(version=5,fraction=0.5\) names version 5.*loaded: \[3, 4\]"):
        r.check("m", {3, 4})


def test_the_split_is_stable_per_id_and_shares_by_weight() -> None:
    r = parsed(traffic_split="1=70,2=30")
    ids = [f"id-{i}" for i in range(20_000)]
    first = [r.pick("m", i) for i in ids]
    assert [r.pick("m", i) for i in ids] == first  # the same id, the same version
    shares = Counter(first)
    assert abs(shares[2] / len(ids) - 0.30) < 0.02
    assert [r.pick("other", i) for i in ids[:200]] != first[:200]  # the model name is part of the key
    drawn = Counter(r.pick("m", "") for _ in range(20_000))
    assert abs(drawn[2] / 20_000 - 0.30) < 0.02
    assert {parsed(traffic_split="1=0,2=5").pick("m", i) for i in ids[:100]} == {2}


def test_shadow_sampling_follows_the_fraction() -> None:
    assert all(parsed(shadow="version=2,fraction=1").sample_shadow() for _ in range(1000))
    share = sum(parsed(shadow="version=2,fraction=0.2").sample_shadow() for _ in range(20_000)) / 20_000
    assert abs(share - 0.2) < 0.02
    assert not parsed(version_labels="a=1").sample_shadow()


def test_compare_labels_scores_and_regressions() -> None:
    labels = OutputAgreement()
    compare(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), True, labels)
    assert (labels.rows, labels.labelled, labels.agreed, labels.agreement) == (4, 4, 3, 0.75)
    assert labels.mean_abs_difference is None
    scores = OutputAgreement()
    primary = np.array([[0.9, 0.1], [0.2, 0.8]], np.float32)
    compare(primary, np.array([[0.6, 0.4], [0.7, 0.3]], np.float32), True, scores)
    assert scores.agreement == 0.5
    assert scores.mean_abs_difference == pytest.approx((0.3 + 0.3 + 0.5 + 0.5) / 4)
    regression = OutputAgreement()
    compare(np.array([[1.0], [2.0]]), np.array([[1.5], [np.nan]]), True, regression)
    assert regression.agreement is None and regression.mean_abs_difference == 0.5  # non-finite elements are left out
    strings = OutputAgreement()
    compare(np.array([b"cat", b"dog"], object), np.array([b"cat", b"cow"], object), True, strings)
    assert strings.agreement == 0.5
    shapes = OutputAgreement()
    compare(np.zeros((2, 3)), np.zeros((2, 4)), True, shapes)
    assert shapes.agreement == 0.0  # another shape agrees on nothing
    unbatched = OutputAgreement()
    compare(np.array([3, 1]), np.array([3, 1]), False, unbatched)
    assert (unbatched.rows, unbatched.agreement) == (1, 1.0)


def test_a_shadowed_prediction_is_logged_beside_the_primary() -> None:
    outputs = {"label": np.array([3])}
    entry = Prediction("m", 1, "a" * 64, "r1", "", {"x": np.zeros(2, np.float32)}, outputs, 1.5, PredictionLogOptions())
    plain = json.loads(encode_prediction(entry))
    assert "shadow" not in plain
    shadowed = Prediction(
        "m", 1, "a" * 64, "r1", "", {}, outputs, 1.5, PredictionLogOptions(),
        shadow=ShadowPrediction(2, "b" * 64, {"label": np.array([5])}, 2.25),
    )  # fmt: skip
    record = json.loads(encode_prediction(shadowed))
    assert record["shadow"] == {
        "version": 2,
        "sha256": "b" * 64,
        "latency_ms": 2.25,
        "outputs": {"label": {"datatype": "INT64", "shape": [1], "data": [5]}},
    }
    dropped = ShadowPrediction(2, "b" * 64, {}, 0.0, "dropped: the server was saturated")
    entry = Prediction("m", 1, "", "", "", {}, outputs, 1.0, PredictionLogOptions(), shadow=dropped)
    assert json.loads(encode_prediction(entry))["shadow"]["error"] == "dropped: the server was saturated"


# ---- the shadow runner's bound, failures and close, with a stand-in shadow version ------------------------------


class FakeVersion:
    """What ShadowRunner uses of a ModelVersion; ``infer`` waits for ``gate`` and fails when ``error`` is set."""

    def __init__(self, version: int, gate: asyncio.Event | None = None, error: Exception | None = None) -> None:
        self.name, self.version, self.sha256 = "m", version, "0" * 64
        self.max_batch_size, self.queued, self.monitor = 8, 0, None
        self.output_index = {"y": 0}
        self.policy = types.SimpleNamespace(levels=(None,))
        self.stats = VersionStats()
        self.gate, self.error = gate, error
        self.started = 0

    def describe(self) -> str:
        return f"model 'm' version {self.version}"

    async def infer(self, feeds: dict[str, np.ndarray], rows: int, **_: object) -> tuple[list[np.ndarray], float, None]:
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [feeds["x"] * 2], 0.0, None


class FakeRepository:
    def __init__(self, routing: Routing) -> None:
        self.model = types.SimpleNamespace(routing=routing)

    def get_model(self, name: str) -> object:
        return self.model


def runner_for(max_in_flight: int, **options: object) -> ShadowRunner:
    found = parsed(shadow=f"version=2,fraction=1,max_in_flight={max_in_flight}")
    return ShadowRunner(FakeRepository(found), **options)  # type: ignore[arg-type]


def submit(runner: ShadowRunner, primary: FakeVersion, shadow: FakeVersion) -> None:
    x = np.ones((1, 2), np.float32)
    runner.submit(primary, shadow, {"x": x}, 1, ["y"], [x * 2], None, None)  # type: ignore[arg-type]


def test_shadow_runs_past_the_bound_or_behind_a_queue_are_dropped_and_counted() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        primary, shadow = FakeVersion(1), FakeVersion(2, gate)
        runner = runner_for(max_in_flight=2)
        for _ in range(5):
            submit(runner, primary, shadow)
        await asyncio.sleep(0)
        stats = runner.stats[("m", 1, 2)]
        assert (shadow.started, stats.dropped, runner.in_flight) == (2, {"max_in_flight": 3}, 2)
        gate.set()
        while runner.in_flight:
            await asyncio.sleep(0)
        assert (stats.runs, stats.failed) == (2, 0) and stats.outputs["y"].mean_abs_difference == 0.0
        assert shadow.stats.routes["shadow"] == 2
        shadow.queued = 1  # real traffic waits for the shadow version: the shadow yields to it
        submit(runner, primary, shadow)
        assert stats.dropped == {"max_in_flight": 3, "queued": 1} and runner.in_flight == 0
        await runner.close()

    asyncio.run(scenario())


def test_a_saturated_loop_sheds_shadow_runs_but_one_a_second() -> None:
    async def scenario() -> None:
        busy, now = [0.9], [100.0]
        runner = runner_for(16, loop_busy=lambda: busy[0], max_loop_busy=0.6, clock=lambda: now[0])
        primary, shadow = FakeVersion(1), FakeVersion(2)
        for _ in range(4):  # the first runs: none ran within the last second (the trickle); the rest are shed
            submit(runner, primary, shadow)
        stats = runner.stats[("m", 1, 2)]
        assert (shadow.started, stats.dropped) == (0, {"saturated": 3})  # started: its task has not run yet
        now[0] += TRICKLE_S / 2
        submit(runner, primary, shadow)
        now[0] += TRICKLE_S / 2  # a second after the last run started: the next one runs
        submit(runner, primary, shadow)
        submit(runner, primary, shadow)
        assert stats.dropped == {"saturated": 5} and runner.in_flight == 2
        busy[0] = 0.1  # spare capacity: every sampled run runs
        for _ in range(3):
            submit(runner, primary, shadow)
        assert stats.dropped == {"saturated": 5} and runner.in_flight == 5
        while runner.in_flight:
            await asyncio.sleep(0)
        assert stats.runs == shadow.started == 5
        await runner.close()

    asyncio.run(scenario())


def test_a_shadow_withdrawn_meanwhile_is_dropped() -> None:
    async def scenario() -> None:
        runner = runner_for(16)
        submit(runner, FakeVersion(1), FakeVersion(3))  # the model's shadow is version 2 now
        assert runner.stats[("m", 1, 3)].dropped == {"withdrawn": 1} and runner.in_flight == 0
        await runner.close()

    asyncio.run(scenario())


def test_a_failing_shadow_is_counted_and_close_cancels_runs_in_flight() -> None:
    async def scenario() -> None:
        runner = runner_for(max_in_flight=4)
        primary = FakeVersion(1)
        submit(runner, primary, FakeVersion(2, error=Internal("onnxruntime failed")))
        while runner.in_flight:
            await asyncio.sleep(0)
        assert runner.stats[("m", 1, 2)].failed == 1
        stuck = FakeVersion(2, asyncio.Event())  # never answers
        submit(runner, primary, stuck)
        await asyncio.sleep(0)
        assert runner.in_flight == 1
        await asyncio.wait_for(runner.close(), 10)
        assert runner.in_flight == 0
        submit(runner, primary, FakeVersion(2))  # closed: dropped
        assert runner.stats[("m", 1, 2)].dropped == {"shutdown": 1} and runner.in_flight == 0

    asyncio.run(scenario())

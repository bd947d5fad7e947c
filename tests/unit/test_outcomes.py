"""Outcomes: settings from config.pbtxt, joining reported truth with remembered predictions, the bounded pending
store, rolling accuracy and error, and the ferry.v1.OutcomeService servicer on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest
from google.protobuf import text_format

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.observability.outcomes import (
    CLASSIFICATION,
    REGRESSION,
    SERVICE_NAME,
    OutcomeServicer,
    OutcomeSettings,
    OutcomeTracker,
    ReportedOutcome,
)

CONFIG = """
name: "m" max_batch_size: 8
output [ { name: "label" data_type: TYPE_INT64 dims: [ ] }, { name: "scores" data_type: TYPE_FP32 dims: [ 3 ] },
         { name: "value" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "name" data_type: TYPE_STRING dims: [ 1 ] },
         { name: "open" data_type: TYPE_FP32 dims: [ -1 ] } ]
"""


def _config(**parameters: str) -> mc.ModelConfig:
    config = text_format.Parse(CONFIG, mc.ModelConfig())
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


# -- settings -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "task", "expected"),
    [
        ("label", "", CLASSIFICATION),
        ("scores", "", CLASSIFICATION),  # the argmax of a score vector
        ("value", "", REGRESSION),
        ("name", "", CLASSIFICATION),
        ("value", "classification", CLASSIFICATION),
        ("label", "regression", REGRESSION),
    ],
)
def test_settings_choose_the_task_from_the_output(output: str, task: str, expected: str) -> None:
    parameters = {"outcome_output": output} | ({"outcome_task": task} if task else {})
    assert OutcomeSettings.from_parameters(_config(**parameters)) == OutcomeSettings(output, expected)


def test_no_outcome_output_means_off() -> None:
    assert OutcomeSettings.from_parameters(_config()) is None


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"outcome_output": "nope"}, "outcome_output 'nope' is not an output of the model (['label', 'name', 'open'"),
        ({"outcome_output": "label", "outcome_task": "ranking"}, "outcome_task must be classification or regression"),
        ({"outcome_task": "regression"}, "outcome_task is set but outcome_output is not"),
        ({"outcome_output": "scores", "outcome_task": "regression"}, "regression needs one number per row"),
        ({"outcome_output": "name", "outcome_task": "regression"}, "regression needs one number per row"),
        ({"outcome_output": "open", "outcome_task": "regression"}, "TYPE_FP32 with dims [-1]"),
    ],
)
def test_settings_reject_bad_parameters(parameters: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        OutcomeSettings.from_parameters(_config(**parameters))
    assert caught.value.message.startswith("model 'm' parameters: ")
    assert message in caught.value.message


# -- the tracker --------------------------------------------------------------------------------------------------


def truth(request_id: str, value: int | float | str, row: int = 0, model: str = "m") -> ReportedOutcome:
    return ReportedOutcome(model, request_id, value, row)


def test_join_a_multi_row_request() -> None:
    tracker = OutcomeTracker(window=100, max_pending=10)
    tracker.remember("m", 1, "r1", np.array([3, 5], np.int64), CLASSIFICATION)
    result = tracker.report([truth("r1", 3, row=0), truth("r1", 4, row=1)])
    assert (result.matched, result.unmatched_index) == (2, ())
    assert tracker.accuracy("m", 1) == 0.5
    assert tracker.mean_abs_error("m", 1) is None
    assert tracker.pending == 0  # every row reported: the prediction is let go


def test_unknown_repeated_and_duplicate_outcomes_are_unmatched_not_errors() -> None:
    tracker = OutcomeTracker(window=100, max_pending=10)
    tracker.remember("m", 1, "r1", np.array([3, 5]), CLASSIFICATION)
    first = tracker.report([truth("r1", 3), truth("r1", 3), truth("nope", 1), truth("r1", 5, model="other")])
    assert (first.matched, first.unmatched_index) == (1, (1, 2, 3))
    again = tracker.report([truth("r1", 3)])  # a retried call does not count twice
    assert (again.matched, again.unmatched_index) == (0, (0,))
    assert (tracker.matched, tracker.unmatched) == (1, 4)
    stats = tracker.stats("m", 1)
    assert stats is not None and (stats.count, stats.total, stats.accuracy) == (1, 1, 1.0)


def test_pending_predictions_are_bounded_oldest_first() -> None:
    tracker = OutcomeTracker(window=100, max_pending=3)
    for i in range(5):
        tracker.remember("m", 1, f"r{i}", np.array([i]), CLASSIFICATION)
    assert (tracker.pending, tracker.remembered, tracker.forgotten) == (3, 5, 2)
    result = tracker.report([truth(f"r{i}", i) for i in range(5)])
    assert (result.matched, result.unmatched_index) == (3, (0, 1))


def test_a_repeated_request_id_replaces_the_older_prediction() -> None:
    tracker = OutcomeTracker(window=100, max_pending=3)
    tracker.remember("m", 1, "r", np.array([1]), CLASSIFICATION)
    tracker.remember("m", 2, "r", np.array([2]), CLASSIFICATION)
    tracker.remember("m", 1, "", np.array([2]), CLASSIFICATION)  # no id: cannot be joined, not held
    assert tracker.pending == 1
    assert tracker.report([truth("r", 2)]).matched == 1
    assert tracker.versions() == [("m", 2)] and tracker.accuracy("m", 2) == 1.0


def test_accuracy_is_over_a_rolling_window_per_version() -> None:
    tracker = OutcomeTracker(window=4, max_pending=100)
    for i, correct in enumerate([True, True, False, False, False, False]):
        tracker.remember("m", 1, f"r{i}", np.array([7]), CLASSIFICATION)
        tracker.report([truth(f"r{i}", 7 if correct else 8)])
        if i == 3:
            assert tracker.accuracy("m", 1) == 0.5
    stats = tracker.stats("m", 1)
    assert stats is not None and (stats.count, stats.total, stats.accuracy) == (4, 6, 0.0)
    tracker.remember("m", 2, "v2", np.array([7]), CLASSIFICATION)
    tracker.report([truth("v2", 7)])
    assert tracker.accuracy("m", 2) == 1.0 and tracker.accuracy("m", 1) == 0.0
    assert tracker.versions() == [("m", 1), ("m", 2)]
    tracker.drop_version("m", 1)
    assert tracker.stats("m", 1) is None


def test_mean_absolute_error_over_the_window() -> None:
    tracker = OutcomeTracker(window=2, max_pending=100)
    tracker.remember("m", 1, "r", np.array([[10.0], [10.0], [10.0]], np.float32), REGRESSION)
    tracker.report([truth("r", 9.0, 0)])
    assert tracker.mean_abs_error("m", 1) == 1.0
    tracker.report([truth("r", 12.0, 1), truth("r", 13.0, 2)])  # errors 1, 2, 3: the window keeps 2 and 3
    assert tracker.mean_abs_error("m", 1) == 2.5
    assert tracker.accuracy("m", 1) is None


def test_scores_are_joined_by_their_argmax_and_strings_by_name() -> None:
    tracker = OutcomeTracker(window=10, max_pending=10)
    tracker.remember("m", 1, "s", np.array([[0.1, 0.7, 0.2], [0.8, 0.1, 0.1]], np.float32), CLASSIFICATION)
    assert tracker.report([truth("s", 1, 0), truth("s", 2, 1)]).matched == 2
    assert tracker.accuracy("m", 1) == 0.5
    tracker.remember("m", 2, "n", np.array([["cat"], ["dog"]], dtype=object), CLASSIFICATION)
    tracker.report([truth("n", "cat", 0), truth("n", "cat", 1)])
    assert tracker.accuracy("m", 2) == 0.5


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (truth("r", 1, row=2), "outcome 1: row 2 is out of range: request 'r' of model 'm' had 2 rows"),
        (
            truth("r", 1.5, row=1),
            "outcome 1 (model 'm', request 'r'): the model is a classifier: report label or class_label",
        ),
        (truth("r", "three", row=1), "the model predicts integer classes: report label, not class_label"),
        (truth("", 1), "outcome 1: request_id is empty"),
        (truth("r", 1, model=""), "outcome 1: model_name is empty"),
        (truth("r", float("nan")), "outcome 1: target must be finite, got nan"),
    ],
)
def test_a_malformed_outcome_fails_the_call_and_records_nothing(outcome: ReportedOutcome, message: str) -> None:
    tracker = OutcomeTracker(window=10, max_pending=10)
    tracker.remember("m", 1, "r", np.array([1, 2]), CLASSIFICATION)
    with pytest.raises(InvalidArgument) as caught:
        tracker.report([truth("r", 1, row=0), outcome])
    assert message in caught.value.message
    assert tracker.stats("m", 1) is None and (tracker.matched, tracker.unmatched) == (0, 0)
    assert tracker.report([truth("r", 1, row=0)]).matched == 1  # the valid one was not consumed


def test_regression_wants_a_target() -> None:
    tracker = OutcomeTracker(window=10, max_pending=10)
    tracker.remember("m", 1, "r", np.array([1.0]), REGRESSION)
    with pytest.raises(InvalidArgument, match="the model is a regression model: report target, not a class label"):
        tracker.report([truth("r", 1)])


# -- the gRPC service ---------------------------------------------------------------------------------------------


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


@contextlib.asynccontextmanager
async def _serve(tracker: OutcomeTracker) -> AsyncIterator[fpb_grpc.OutcomeServiceStub]:
    server = grpc.aio.server()
    fpb_grpc.add_OutcomeServiceServicer_to_server(OutcomeServicer(tracker), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield fpb_grpc.OutcomeServiceStub(channel)
    finally:
        await server.stop(0)


def test_report_outcomes_over_grpc() -> None:
    async def test() -> None:
        tracker = OutcomeTracker(window=10, max_pending=10)
        tracker.remember("digits", 2, "a", np.array([3, 4]), CLASSIFICATION)
        tracker.remember("price", 1, "b", np.array([[2.5]], np.float32), REGRESSION)
        async with _serve(tracker) as stub:
            reply = await stub.ReportOutcomes(
                fpb.ReportOutcomesRequest(
                    outcomes=[
                        fpb.Outcome(request_id="a", model_name="digits", label=3),
                        fpb.Outcome(request_id="zz", model_name="digits", label=3),
                        fpb.Outcome(request_id="a", model_name="digits", label=9, row=1),
                        fpb.Outcome(request_id="b", model_name="price", target=2.0),
                    ]
                ),
                timeout=10,
            )
            assert (reply.matched, reply.unmatched, list(reply.unmatched_index)) == (3, 1, [1])
            assert tracker.accuracy("digits", 2) == 0.5 and tracker.mean_abs_error("price", 1) == 0.5
            empty = await stub.ReportOutcomes(fpb.ReportOutcomesRequest(), timeout=10)
            assert (empty.matched, empty.unmatched) == (0, 0)

    run(test)


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (fpb.Outcome(request_id="a", model_name="digits"), "outcome 0: no value: set label, target or class_label"),
        (fpb.Outcome(model_name="digits", label=1), "outcome 0: request_id is empty"),
        (fpb.Outcome(request_id="a", model_name="digits", target=1.0), "the model is a classifier"),
    ],
)
def test_malformed_outcomes_are_invalid_argument(outcome: fpb.Outcome, message: str) -> None:
    async def test() -> None:
        tracker = OutcomeTracker(window=10, max_pending=10)
        tracker.remember("digits", 2, "a", np.array([3]), CLASSIFICATION)
        async with _serve(tracker) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ReportOutcomes(fpb.ReportOutcomesRequest(outcomes=[outcome]), timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (caught.value.details() or "")
        assert tracker.pending == 1

    run(test)


def test_service_name() -> None:
    assert SERVICE_NAME == "ferry.v1.OutcomeService"

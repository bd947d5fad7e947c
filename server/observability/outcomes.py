"""Outcomes: true labels or values reported after the fact, joined with remembered predictions into live accuracy
(classification) or absolute error (regression) per model version over a rolling window.

The request path calls :meth:`OutcomeTracker.remember` for a sampled request of a model with ``outcome_output``
configured: one dict insert holding a *reference* to that output array (no copy, no conversion). Clients report
truth through ``ferry.v1.OutcomeService/ReportOutcomes`` (:class:`OutcomeServicer`); each outcome names the request
id, the model and the row of the request's batch. Joining converts the remembered row to a predicted class (the
value of a label output, or the argmax of a score vector) or value, and adds one entry to the version's window.

Rules, so that clients can retry a call safely: an outcome for a prediction the tracker does not hold (never
sampled, forgotten because ``max_pending`` newer ones came, or that row already reported) is *unmatched*, not an
error. A malformed outcome (empty id or model, no value, a non-finite target, a row past the request's rows, a kind
that does not fit the model's task) fails the whole call with INVALID_ARGUMENT and nothing is recorded.

config.pbtxt ``parameters``: ``outcome_output`` (the output holding the prediction; unset = outcomes off) and
``outcome_task`` (``classification`` or ``regression``; by default classification for integer, bool and string
outputs and for float outputs with several values per row, regression for one float per row).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ferry.client._proto import ferry_pb2 as fpb
from ferry.client._proto import ferry_pb2_grpc as fpb_grpc
from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.server.api.rpc import rpc
from ferry.server.observability.telemetry import NO_TRACING, Tracing

CLASSIFICATION = "classification"
REGRESSION = "regression"
PARAMETERS = ("outcome_output", "outcome_task")
"""The config.pbtxt ``parameters`` keys read by :meth:`OutcomeSettings.from_parameters`."""
SERVICE_NAME = fpb.DESCRIPTOR.services_by_name["OutcomeService"].full_name
_FLOAT_TYPES = (mc.TYPE_FP16, mc.TYPE_FP32, mc.TYPE_FP64, mc.TYPE_BF16)

Truth = int | float | str
"""A reported value: ``int`` a class label, ``float`` a regression target, ``str`` a string class label."""


@dataclass(frozen=True, slots=True)
class OutcomeSettings:
    """Which output of a model holds its prediction, and whether it is a class or a value."""

    output: str
    task: str

    @classmethod
    def from_parameters(cls, config: mc.ModelConfig) -> OutcomeSettings | None:
        """The settings of a *completed* config, or None when ``outcome_output`` is unset (outcomes off)."""
        params = {k: v.string_value for k, v in config.parameters.items()}
        where = f"model {config.name!r} parameters"
        name = params.get("outcome_output", "")
        task = params.get("outcome_task", "")
        if not name:
            if task:
                raise InvalidArgument(f"{where}: outcome_task is set but outcome_output is not")
            return None
        outputs = {t.name: t for t in config.output}
        if name not in outputs:
            raise InvalidArgument(f"{where}: outcome_output {name!r} is not an output of the model ({sorted(outputs)})")
        tensor = outputs[name]
        dims = list(tensor.dims) if config.max_batch_size > 0 else list(tensor.dims)[1:]
        per_row = math.prod(dims) if all(d >= 0 for d in dims) else -1  # -1: not fixed
        if not task:
            task = REGRESSION if tensor.data_type in _FLOAT_TYPES and per_row == 1 else CLASSIFICATION
        if task not in (CLASSIFICATION, REGRESSION):
            raise InvalidArgument(f"{where}: outcome_task must be {CLASSIFICATION} or {REGRESSION}, got {task!r}")
        if task == REGRESSION and (tensor.data_type in (mc.TYPE_STRING, mc.TYPE_BOOL) or per_row != 1):
            raise InvalidArgument(
                f"{where}: regression needs one number per row in outcome_output {name!r}, which is "
                f"{mc.DataType.Name(tensor.data_type)} with dims {list(tensor.dims)}"
            )
        if task == CLASSIFICATION and tensor.data_type == mc.TYPE_STRING and per_row != 1:
            raise InvalidArgument(f"{where}: outcome_output {name!r} must hold one string label per row")
        return cls(name, task)


@dataclass(frozen=True, slots=True)
class ReportedOutcome:
    """One outcome as the tracker takes it (the servicer converts ``ferry.v1.Outcome``)."""

    model: str
    request_id: str
    value: Truth
    row: int = 0


@dataclass(frozen=True, slots=True)
class ReportResult:
    matched: int
    unmatched_index: tuple[int, ...]
    """Positions of the unmatched outcomes in the reported sequence."""


@dataclass(frozen=True, slots=True)
class OutcomeStats:
    """One version's window: ``accuracy`` for a classifier, ``mean_abs_error`` for regression (None otherwise)."""

    task: str
    count: int
    """Outcomes in the window now."""
    total: int
    """Outcomes ever joined for this version."""
    accuracy: float | None
    mean_abs_error: float | None


@dataclass(slots=True)
class _Pending:
    version: int
    output: np.ndarray
    task: str
    reported: set[int] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return len(self.output) if self.output.ndim else 1


@dataclass(slots=True)
class _Window:
    task: str
    values: deque[float]
    total: int = 0
    sum: float = 0.0

    def add(self, value: float) -> None:
        if len(self.values) == self.values.maxlen:
            self.sum -= self.values[0]
        self.values.append(value)
        self.sum += value
        self.total += 1
        if self.total % (self.values.maxlen or 1) == 0:  # bound float drift of the running sum
            self.sum = math.fsum(self.values)


class OutcomeTracker:
    """Remembered predictions (at most ``max_pending``, oldest forgotten first) and a rolling window of the last
    ``window`` joined outcomes per model version. Thread-safe. Counters: ``remembered``, ``forgotten`` (pushed out
    by newer predictions), ``matched``, ``unmatched``."""

    def __init__(self, window: int, max_pending: int) -> None:
        if window < 1 or max_pending < 1:
            raise ValueError(f"window and max_pending must be >= 1, got {window} and {max_pending}")
        self.window = window
        self.max_pending = max_pending
        self.remembered = self.forgotten = self.matched = self.unmatched = 0
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()
        self._windows: dict[tuple[str, int], _Window] = {}
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def remember(self, model: str, version: int, request_id: str, output: np.ndarray, task: str) -> None:
        """Hold one request's prediction (``output``: its rows of the ``outcome_output`` tensor, referenced not
        copied) until its outcomes arrive. A request without an id cannot be joined and is not held; a repeated id
        replaces the older prediction."""
        if not request_id:
            return
        key = (model, request_id)
        with self._lock:
            self._pending.pop(key, None)
            self._pending[key] = _Pending(version, output, task)
            self.remembered += 1
            if len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
                self.forgotten += 1

    def report(self, outcomes: Sequence[ReportedOutcome], count_unmatched: bool = True) -> ReportResult:
        """Join outcomes with remembered predictions: all of them or, if one is malformed, none (InvalidArgument).
        ``count_unmatched`` False: the caller counts the unmatched ones (:meth:`count_unmatched`) once it has
        offered them elsewhere (another worker's predictions)."""
        with self._lock:
            joined: list[tuple[tuple[str, str], _Pending, int, float]] = []
            unmatched: list[int] = []
            seen: set[tuple[str, str, int]] = set()
            for i, outcome in enumerate(outcomes):
                _check(i, outcome)
                key = (outcome.model, outcome.request_id)
                entry = self._pending.get(key)
                if entry is None or outcome.row in entry.reported or (*key, outcome.row) in seen:
                    unmatched.append(i)
                    continue
                if outcome.row >= entry.rows:
                    raise InvalidArgument(
                        f"outcome {i}: row {outcome.row} is out of range: request {outcome.request_id!r} of model "
                        f"{outcome.model!r} had {entry.rows} rows"
                    )
                seen.add((*key, outcome.row))
                joined.append((key, entry, outcome.row, _score(i, outcome, entry)))
            for key, entry, row, score in joined:  # nothing raises past this point: the call is all or nothing
                entry.reported.add(row)
                if len(entry.reported) == entry.rows:
                    self._pending.pop(key, None)
                window = self._windows.get((key[0], entry.version))
                if window is None or window.task != entry.task:
                    window = self._windows[(key[0], entry.version)] = _Window(entry.task, deque(maxlen=self.window))
                window.add(score)
            self.matched += len(joined)
            if count_unmatched:
                self.unmatched += len(unmatched)
            return ReportResult(len(joined), tuple(unmatched))

    def count_unmatched(self, count: int) -> None:
        with self._lock:
            self.unmatched += count

    def stats(self, model: str, version: int) -> OutcomeStats | None:
        """The version's window, or None before its first joined outcome."""
        with self._lock:
            window = self._windows.get((model, version))
            if window is None:
                return None
            count = len(window.values)
            mean = window.sum / count if count else None
            classifier = window.task == CLASSIFICATION
            return OutcomeStats(
                window.task, count, window.total, mean if classifier else None, None if classifier else mean
            )

    def accuracy(self, model: str, version: int) -> float | None:
        """Fraction of correct predictions in the window (classification), else None."""
        stats = self.stats(model, version)
        return None if stats is None else stats.accuracy

    def mean_abs_error(self, model: str, version: int) -> float | None:
        """Mean absolute error over the window (regression), else None."""
        stats = self.stats(model, version)
        return None if stats is None else stats.mean_abs_error

    def versions(self) -> list[tuple[str, int]]:
        """(model, version) pairs with a window, sorted: what to export as metrics."""
        with self._lock:
            return sorted(self._windows)

    def drop_version(self, model: str, version: int) -> None:
        """Forget a version's window (call when it unloads); its pending predictions age out on their own."""
        with self._lock:
            self._windows.pop((model, version), None)


def _check(i: int, outcome: ReportedOutcome) -> None:
    if not outcome.request_id:
        raise InvalidArgument(f"outcome {i}: request_id is empty")
    if not outcome.model:
        raise InvalidArgument(f"outcome {i}: model_name is empty")
    if isinstance(outcome.value, float) and not math.isfinite(outcome.value):
        raise InvalidArgument(f"outcome {i}: target must be finite, got {outcome.value}")


def _score(i: int, outcome: ReportedOutcome, entry: _Pending) -> float:
    """1.0 / 0.0 for a correct / wrong class, or the absolute error of a value."""
    where = f"outcome {i} (model {outcome.model!r}, request {outcome.request_id!r})"
    value = outcome.value
    predicted = np.asarray(entry.output[outcome.row] if entry.output.ndim else entry.output).reshape(-1)
    if entry.task == REGRESSION:
        if not isinstance(value, float):
            raise InvalidArgument(f"{where}: the model is a regression model: report target, not a class label")
        return abs(float(predicted[0]) - value)
    if isinstance(value, float):
        raise InvalidArgument(f"{where}: the model is a classifier: report label or class_label, not target")
    if predicted.dtype.kind in "OSU":
        if not isinstance(value, str):
            raise InvalidArgument(f"{where}: the model predicts string classes: report class_label, not label")
        item = predicted[0]
        return float((item.decode() if isinstance(item, bytes) else str(item)) == value)
    if isinstance(value, str):
        raise InvalidArgument(f"{where}: the model predicts integer classes: report label, not class_label")
    label = int(np.argmax(predicted)) if predicted.size > 1 else predicted[0]
    return float(label == value)


class OutcomeServicer(fpb_grpc.OutcomeServiceServicer):
    """``ferry.v1.OutcomeService`` over an :class:`OutcomeTracker`."""

    def __init__(self, tracker: OutcomeTracker, tracing: Tracing = NO_TRACING) -> None:
        self._tracker = tracker
        self.tracing = tracing
        self.service_name = SERVICE_NAME

    @rpc
    async def ReportOutcomes(self, request: fpb.ReportOutcomesRequest, context: object) -> fpb.ReportOutcomesResponse:
        outcomes = [from_proto(i, o) for i, o in enumerate(request.outcomes)]
        result = self._tracker.report(outcomes)
        return fpb.ReportOutcomesResponse(
            matched=result.matched,
            unmatched=len(result.unmatched_index),
            unmatched_index=result.unmatched_index,
        )


def from_proto(i: int, outcome: fpb.Outcome) -> ReportedOutcome:
    kind = outcome.WhichOneof("value")
    if kind is None:
        raise InvalidArgument(f"outcome {i}: no value: set label, target or class_label")
    value: Truth
    if kind == "label":
        value = outcome.label
    elif kind == "target":
        value = outcome.target
    else:
        value = outcome.class_label
    return ReportedOutcome(outcome.model_name, outcome.request_id, value, outcome.row)


__all__ = [
    "CLASSIFICATION",
    "PARAMETERS",
    "REGRESSION",
    "SERVICE_NAME",
    "OutcomeServicer",
    "OutcomeSettings",
    "OutcomeStats",
    "OutcomeTracker",
    "ReportResult",
    "ReportedOutcome",
    "from_proto",
]

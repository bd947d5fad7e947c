"""Outcomes: the truth about earlier predictions, reported by request id to Ferry's ``ferry.v1.OutcomeService``.

A model whose config.pbtxt names an ``outcome_output`` remembers (bounded) each answered request that carried an
``id``; reporting the true label or value later joins it with that prediction into live accuracy or error::

    client.infer("digits", {"input": x}, request_id="order-17")
    ...
    report = client.report_outcomes("digits", {"order-17": 3})  # report.matched == 1

An outcome whose prediction the server does not hold (no id, never remembered, forgotten, already reported) is
*unmatched*, not an error, so a report may be retried.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ferry.client._proto import ferry_pb2 as fpb

__all__ = ["Outcome", "OutcomeReport", "Truth"]

Truth = int | float | str
"""A reported value: an ``int`` class label, a ``float`` regression target, or a ``str`` class label."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """The truth about one row of an earlier request: ``value`` is an ``int`` class label, a ``float`` regression
    target or a ``str`` class label; ``row`` is the row of that request's batch (0 for a one-row request)."""

    request_id: str
    value: Truth
    row: int = 0


@dataclass(frozen=True, slots=True)
class OutcomeReport:
    """What the server made of one report."""

    matched: int
    """Outcomes joined with a remembered prediction."""
    unmatched: int
    """Outcomes with no remembered prediction."""
    unmatched_index: tuple[int, ...] = ()
    """Positions of the unmatched outcomes in the order they were reported."""


def encode_outcomes(model: str, outcomes: Mapping[str, Truth] | Iterable[Outcome]) -> Any:
    """A ``ReportOutcomesRequest``: ``outcomes`` maps request ids to values (row 0), or is a sequence of
    :class:`Outcome`."""
    if isinstance(outcomes, Mapping):
        items = [Outcome(request_id, value) for request_id, value in outcomes.items()]
    else:
        items = list(outcomes)
    request = fpb.ReportOutcomesRequest()
    for item in items:
        if not isinstance(item, Outcome):
            raise TypeError(f"outcomes must be a mapping of request id to value, or Outcome objects, not {item!r}")
        message = request.outcomes.add(request_id=item.request_id, model_name=model, row=item.row)
        value = item.value
        if isinstance(value, str):
            message.class_label = value
        elif isinstance(value, int | np.integer | np.bool_):  # bool is an int: label 0 or 1
            message.label = int(value)
        elif isinstance(value, float | np.floating):
            message.target = float(value)
        else:
            raise TypeError(f"outcome {item.request_id!r}: {type(value).__name__} is not int, float or str")
    return request


def decode_report(reply: Any) -> OutcomeReport:
    return OutcomeReport(reply.matched, reply.unmatched, tuple(reply.unmatched_index))

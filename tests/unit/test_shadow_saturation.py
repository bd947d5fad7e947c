"""The shadow's saturation signal (inference/shadow.py): shadow runs are shed while the event loop is busier than
its bound, with hysteresis, and the bound is validated in the config. Through a real server:
tests/integration/test_routing.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ferry.client.errors import InvalidArgument
from ferry.server.config import ServerConfig
from ferry.server.inference.shadow import HYSTERESIS, ShadowRunner
from ferry.server.models.repository import ModelRepository


def runner(tmp_path: Path, readings: list[float], bound: float) -> ShadowRunner:
    """A runner whose loop-busy reader returns ``readings`` in turn."""
    it = iter(readings)
    return ShadowRunner(ModelRepository(ServerConfig.build(model_repository=tmp_path)), loop_busy=lambda: next(it),
                        max_loop_busy=bound)  # fmt: skip


def test_saturated_past_the_bound_until_clearly_under_it(tmp_path: Path) -> None:
    bound = 0.6
    low = bound * (1 - HYSTERESIS)
    readings = [0.1, 0.59, 0.61, 0.55, low + 0.01, 0.95, low - 0.01, 0.55, 0.0]
    expected = [False, False, True, True, True, True, False, False, False]
    shadows = runner(tmp_path, readings, bound)
    assert [shadows.saturated() for _ in readings] == expected


def test_a_bound_of_one_never_saturates_and_zero_always_does(tmp_path: Path) -> None:
    readings = [0.0, 0.5, 1.0, 1.0]
    never = runner(tmp_path, readings, 1.0)
    assert not any(never.saturated() for _ in readings)
    always = runner(tmp_path, [0.001, 0.0, 0.0], 0.0)
    assert all(always.saturated() for _ in range(3))  # once busy at all, it never reads below 0


def test_the_default_reader_never_reports_a_busy_loop(tmp_path: Path) -> None:
    shadows = ShadowRunner(ModelRepository(ServerConfig.build(model_repository=tmp_path)), max_loop_busy=0.0)
    assert not shadows.saturated()


def test_config_bounds_the_share(tmp_path: Path) -> None:
    assert ServerConfig.build(model_repository=tmp_path).shadow_max_loop_busy == 0.6
    assert ServerConfig.build(model_repository=tmp_path, shadow_max_loop_busy=1.0).shadow_max_loop_busy == 1.0
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(InvalidArgument, match="shadow_max_loop_busy"):
            ServerConfig.build(model_repository=tmp_path, shadow_max_loop_busy=bad)

"""The prediction log: sampled predictions written as JSON Lines to a local, size-rotated file, off the hot path.

The request path pays for a sampling decision (:class:`PredictionSampler`) and, when sampled, for building one
:class:`Prediction` that holds *references* to the request's input and output arrays (immutable views: decoded
requests and split batch outputs are never written to afterwards) and a non-blocking enqueue
(:meth:`PredictionLog.record`). One writer thread turns entries into JSON, applies the per-input ``redact`` and
``hash`` options and the size cap, and writes ``path``, rotating to ``path.1`` … ``path.N`` by size. When the queue is
full the entry is dropped and counted: requests never wait for the disk.

One line per prediction::

    {"timestamp": "2025-01-02T03:04:05.678901Z", "request_id": "42", "trace_id": "4bf9…", "model": "digits",
     "version": 2, "sha256": "…", "latency_ms": 1.25,
     "inputs": {"input": {"datatype": "FP32", "shape": [1, 64], "data": [0.0, …], "truncated": true}},
     "outputs": {"label": {"datatype": "INT64", "shape": [1], "data": [3]}}}

A redacted input has ``"data": "<redacted>"``; a hashed one has ``"sha256"`` (of its raw wire bytes, as in
``raw_input_contents``) instead of ``data``. ``data`` is the row-major flattening of the tensor, cut to the first
``max_elements`` values (then ``"truncated": true``); non-finite floats are the strings ``"nan"``, ``"inf"``,
``"-inf"`` (JSON has no such numbers).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import datatype_of, to_raw

log = logging.getLogger(__name__)

REDACTED = "<redacted>"
PARAMETERS = ("prediction_log_rate", "prediction_log_redact", "prediction_log_hash", "prediction_log_max_elements")
"""The config.pbtxt ``parameters`` keys read by :meth:`PredictionLogOptions.from_parameters`."""
_DEFAULT_MAX_ELEMENTS = 1024


@dataclass(frozen=True, slots=True)
class PredictionLogSettings:
    """Server-wide: where the prediction log goes and how it rotates (the CLI flags)."""

    path: Path | None = None
    """The JSON Lines file; None turns prediction logging off for every model."""

    max_bytes: int = 64 * 1024 * 1024
    """Rotate before a line would take the file past this size; 0 never rotates."""

    backups: int = 5
    """Rotated files kept (``path.1`` newest … ``path.N`` oldest); 0 truncates ``path`` instead of rotating."""

    queue_size: int = 10_000
    """Entries that may wait for the writer thread; past it, entries are dropped and counted."""

    def __post_init__(self) -> None:
        if self.max_bytes < 0:
            raise InvalidArgument(f"prediction log max_bytes must be >= 0, got {self.max_bytes}")
        if not 0 <= self.backups <= 1000:
            raise InvalidArgument(f"prediction log backups must be in 0..1000, got {self.backups}")
        if not 1 <= self.queue_size <= 10_000_000:
            raise InvalidArgument(f"prediction log queue_size must be in 1..10000000, got {self.queue_size}")


@dataclass(frozen=True, slots=True)
class PredictionLogOptions:
    """Per model, from config.pbtxt ``parameters`` (string values): what to sample and how to write inputs."""

    rate: float = 0.0
    """``prediction_log_rate``: the fraction of requests logged, in [0, 1]; 0 is off."""

    redact: frozenset[str] = frozenset()
    """``prediction_log_redact``: comma-separated input names whose values are written as ``"<redacted>"``."""

    hash: frozenset[str] = frozenset()
    """``prediction_log_hash``: comma-separated input names written as the sha256 of their raw bytes."""

    max_elements: int = _DEFAULT_MAX_ELEMENTS
    """``prediction_log_max_elements``: values written per tensor at most (the rest is cut, marked truncated)."""

    @classmethod
    def from_parameters(cls, config: mc.ModelConfig) -> PredictionLogOptions:
        """Read and validate the options of a *completed* config (its inputs are known)."""
        params = {k: v.string_value for k, v in config.parameters.items()}
        where = f"model {config.name!r} parameters"
        rate = 0.0
        if (raw := params.get("prediction_log_rate")) is not None:
            rate = _float(raw)
            if not 0.0 <= rate <= 1.0:  # also rejects nan
                raise InvalidArgument(f"{where}: prediction_log_rate must be a number in [0, 1], got {raw!r}")
        inputs = [t.name for t in config.input]
        redact = _names(params.get("prediction_log_redact", ""), inputs, f"{where}: prediction_log_redact")
        hashed = _names(params.get("prediction_log_hash", ""), inputs, f"{where}: prediction_log_hash")
        if both := sorted(redact & hashed):
            raise InvalidArgument(f"{where}: inputs {both} are in both prediction_log_redact and prediction_log_hash")
        max_elements = _DEFAULT_MAX_ELEMENTS
        if (raw := params.get("prediction_log_max_elements")) is not None:
            if not raw.isdigit() or int(raw) > 1_000_000:
                raise InvalidArgument(
                    f"{where}: prediction_log_max_elements must be an integer in 0..1000000, got {raw!r}"
                )
            max_elements = int(raw)
        return cls(rate, redact, hashed, max_elements)


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        return math.nan


def _names(raw: str, known: list[str], what: str) -> frozenset[str]:
    if not raw.strip():
        return frozenset()
    names = [name.strip() for name in raw.split(",")]
    if "" in names:
        raise InvalidArgument(f"{what}: empty input name in {raw!r}")
    if unknown := sorted(set(names) - set(known)):
        raise InvalidArgument(f"{what}: {unknown} are not inputs of the model (inputs: {known})")
    return frozenset(names)


class PredictionSampler:
    """Decides per request whether to log it: one comparison against a uniform draw (rate 0 decides nothing)."""

    __slots__ = ("_random", "rate")

    def __init__(self, rate: float, seed: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0:
            raise InvalidArgument(f"sampling rate must be in [0, 1], got {rate}")
        self.rate = rate
        self._random = random.Random(seed).random

    def sample(self) -> bool:
        """True for about ``rate`` of the calls; always False at rate 0, always True at rate 1."""
        return self.rate > 0.0 and (self.rate >= 1.0 or self._random() < self.rate)

    @property
    def enabled(self) -> bool:
        return self.rate > 0.0


@dataclass(frozen=True, slots=True)
class ShadowPrediction:
    """What the model's shadow version made of a logged request (server/inference/shadow.py), written beside the
    primary's outputs."""

    version: int
    sha256: str
    outputs: Mapping[str, np.ndarray]
    latency_ms: float
    error: str = ""
    """Why there are no outputs: the shadow run was dropped (why: inference/shadow.py ``DROP_REASONS``) or failed."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """One logged prediction, as the request path hands it over. Arrays are referenced, not copied: pass views
    that nothing writes to afterwards (decoded inputs and per-request output views are such)."""

    model: str
    version: int
    sha256: str
    request_id: str
    trace_id: str
    """The W3C trace id as 32 hex digits, or "" when the request is not traced."""
    inputs: Mapping[str, np.ndarray]
    outputs: Mapping[str, np.ndarray]
    latency_ms: float
    options: PredictionLogOptions
    timestamp: float = field(default_factory=time.time)
    """Seconds since the epoch (``time.time()``) when the prediction was made."""
    shadow: ShadowPrediction | None = None
    """The shadow version's run of the same request, when the request was shadowed."""


def encode_prediction(entry: Prediction) -> bytes:
    """The JSON line (UTF-8, without the newline) of one prediction; runs in the writer thread."""
    options = entry.options
    stamp = datetime.fromtimestamp(entry.timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    record = {
        "timestamp": stamp,
        "request_id": entry.request_id,
        "trace_id": entry.trace_id,
        "model": entry.model,
        "version": entry.version,
        "sha256": entry.sha256,
        "latency_ms": round(entry.latency_ms, 3),
        "inputs": {name: _tensor(array, options, name) for name, array in entry.inputs.items()},
        "outputs": {name: _tensor(array, options, None) for name, array in entry.outputs.items()},
    }
    if (shadow := entry.shadow) is not None:
        shadowed: dict[str, Any] = {
            "version": shadow.version,
            "sha256": shadow.sha256,
            "latency_ms": round(shadow.latency_ms, 3),
            "outputs": {name: _tensor(array, options, None) for name, array in shadow.outputs.items()},
        }
        if shadow.error:
            shadowed["error"] = shadow.error
        record["shadow"] = shadowed
    # orjson writes numeric arrays straight from their buffers (float32 as its shortest float32 text): measured
    # ~8 µs for a 256-float input against ~210 µs for json.dumps over tolist(), and this runs in a thread that
    # shares the GIL with the event loop.
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


def _tensor(array: np.ndarray, options: PredictionLogOptions, input_name: str | None) -> dict[str, Any]:
    datatype = datatype_of(array)
    out: dict[str, Any] = {"datatype": datatype.name, "shape": list(array.shape)}
    if input_name is not None and input_name in options.redact:
        out["data"] = REDACTED
    elif input_name is not None and input_name in options.hash:
        out["sha256"] = hashlib.sha256(to_raw(array, datatype)).hexdigest()
    else:
        flat = array.reshape(-1)
        if flat.size > options.max_elements:
            flat = flat[: options.max_elements]
            out["truncated"] = True
        out["data"] = _values(flat)
    return out


def _values(flat: np.ndarray) -> np.ndarray | list[Any]:
    if flat.dtype.kind == "f" and not np.isfinite(flat).all():
        return [x if math.isfinite(x) else str(x) for x in flat.tolist()]
    if flat.dtype.kind in "OS":
        return [x.decode("utf-8", "backslashreplace") if isinstance(x, bytes) else str(x) for x in flat.tolist()]
    return np.ascontiguousarray(flat)  # serialized by orjson without a Python object per element


DRAIN_INTERVAL_S = 0.05
"""The writer thread wakes at most this often: entries recorded meanwhile are written together."""


class PredictionLog:
    """A JSON Lines sink fed by :meth:`record` (never blocks) and written by one thread; close with :meth:`close`.

    Counters (plain ints, read them from any thread): ``written`` lines, ``dropped`` entries (queue full or log
    closed), ``failed`` entries (encoding or I/O errors, logged).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        queue_size: int,
        *,
        encode: Callable[[Any], bytes] = encode_prediction,
        label: str = "prediction log",
    ) -> None:
        """``encode`` turns an entry into its JSON line (in the writer thread); ``label`` names the log in messages
        and its thread (the audit log writes through this class too)."""
        PredictionLogSettings(path, max_bytes, backups, queue_size)  # validates
        self.path = Path(path)
        self.label = label
        self.max_bytes = max_bytes
        self.backups = backups
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._encode = encode
        self._entries: deque[Any] = deque()  # appended on the loop, drained by the writer (both atomic)
        self._queue_size = queue_size
        self._wake = threading.Event()  # set by record() when the writer may be asleep
        self._count_lock = threading.Lock()
        self._closed = False
        self._file: Any = None
        self._size = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name=f"ferry-{label.replace(' ', '-')}", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: PredictionLogSettings) -> PredictionLog | None:
        """The server's log, or None when ``settings.path`` is None (logging off)."""
        if settings.path is None:
            return None
        return cls(settings.path, settings.max_bytes, settings.backups, settings.queue_size)

    def record(self, entry: Any) -> bool:
        """Queue one entry (a :class:`Prediction`, or the encoder's kind) for writing; False (and ``dropped`` + 1)
        when the queue is full or the log closed."""
        if not self._closed and len(self._entries) < self._queue_size:
            self._entries.append(entry)
            if not self._wake.is_set():  # at most one wake-up per drain: no lock or thread switch per entry
                self._wake.set()
            return True
        with self._count_lock:  # record() may be called from several threads; drops are the rare path
            self.dropped += 1
        return False

    @property
    def pending(self) -> int:
        """Entries waiting for the writer thread (approximate)."""
        return len(self._entries)

    def close(self, timeout_s: float | None = 10.0) -> None:
        """Stop taking entries, write those already queued, flush and close the file, join the writer thread."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s %s: the writer did not finish within %.1fs", self.label, self.path, timeout_s)
            return
        # A record() that saw the log open while close() ran may have appended after the writer's last drain.
        with self._count_lock:
            self.dropped += len(self._entries)

    # -- the writer thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        """Wake, write everything queued, flush, then let entries gather for ``DRAIN_INTERVAL_S`` before the next
        wake-up: a thread woken per entry costs the event loop a GIL hand-off each time (measured: the log at 10%
        added 11% to a `tiny` request's server CPU that way, BENCHMARKS.md `switched`)."""
        entries = self._entries
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                while entries:
                    self._write_entry(entries.popleft())
                self._flush()  # make what was written visible before sleeping
                if self._closed:
                    return
                time.sleep(DRAIN_INTERVAL_S)
        finally:
            self._flush()
            if self._file is not None:
                self._file.close()
                self._file = None

    def _write_entry(self, entry: Any) -> None:
        try:
            line = self._encode(entry) + b"\n"
        except Exception:
            self.failed += 1
            log.exception("%s: cannot encode an entry of model %r", self.label, getattr(entry, "model", ""))
            return
        try:
            if self._file is None:
                self._open()
            elif self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._file.write(line)
            self._size += len(line)
            self.written += 1
        except Exception as err:  # the writer must outlive any one entry: a full disk, a removed directory
            self.failed += 1
            log.warning("%s %s: write failed: %s", self.label, self.path, err)
            self._close_file()  # reopened for the next entry

    def _open(self) -> None:
        self._file = open(self.path, "ab")  # noqa: SIM115  # held open by the writer across entries
        self._size = self._file.tell()
        if self.max_bytes and self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._close_file()
        if self.backups == 0:
            self._file = open(self.path, "wb")  # noqa: SIM115
        else:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.path.exists():
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def _flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as err:
                self.failed += 1
                log.warning("%s %s: flush failed: %s", self.label, self.path, err)

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


__all__ = [
    "PARAMETERS",
    "REDACTED",
    "Prediction",
    "PredictionLog",
    "PredictionLogOptions",
    "PredictionLogSettings",
    "PredictionSampler",
    "ShadowPrediction",
    "encode_prediction",
]

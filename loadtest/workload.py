"""What the load generator sends: serialized ``ModelInferRequest`` messages, built once, before any load.

The parent process asks the server for the model's metadata and config, builds every request template from the
``--inputs`` source (random, zeros, ``.npy``, ``.npz`` or a JSON file of requests) and serializes it; workers
receive the bytes and send them as they are (a gRPC call with no serializer), so the hot path never touches
protobuf. Synthetic inputs are made unique per request by *stamping* three elements of the first input (run
nonce, worker, counter) into a copy of the template, so a server with a result cache sees misses unless a request
is meant to repeat: ``--duplicate-fraction F`` sends one of a few fixed "hot" requests with probability ``F``.
Requests read from a file are sent verbatim (no stamping); they repeat as the file's requests are cycled.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ferry.client._proto import grpc_service_pb2 as pb
from ferry.client.tensors import DATATYPES, to_raw

VARIANTS_PER_ROWS = 4
HOT_REQUESTS = 4
MIXED_ROWS = (1, 2, 4, 8, 16)
STAMPABLE = {"FP16": "e", "FP32": "f", "FP64": "d", "INT16": "h", "INT32": "i", "INT64": "q",
             "UINT16": "H", "UINT32": "I", "UINT64": "Q"}  # fmt: skip
"""Datatypes whose elements can hold the stamp (struct format of one element). FP16 holds counters to 2048 only."""
_STAMP_LIMIT = {"e": 1 << 11, "f": 1 << 24, "d": 1 << 53, "h": 1 << 15, "H": 1 << 16, "i": 1 << 31, "I": 1 << 32,
                "q": 1 << 62, "Q": 1 << 63}  # fmt: skip
"""Integers each element format holds exactly; stamps wrap around there."""


@dataclass(frozen=True, slots=True)
class InputSpec:
    name: str
    datatype: str
    row_shape: tuple[int, ...]  # shape without the batch dimension


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    version: str
    max_batch_size: int  # 0: no batch dimension, every request is one fixed-shape sample
    inputs: tuple[InputSpec, ...]
    instance_count: int = 1
    dynamic_batching: bool = False
    response_cache: bool = False


@dataclass(frozen=True, slots=True)
class Template:
    """One serialized request: ``rows`` rows; when ``stamp_at >= 0``, three elements of ``stamp_format`` there
    are overwritten per request."""

    payload: bytes
    rows: int
    stamp_at: int = -1
    stamp_format: str = ""


@dataclass(frozen=True, slots=True)
class Workload:
    """Everything a worker needs to make requests; picklable."""

    model: str
    version: str
    templates: tuple[Template, ...]  # unique-request templates, cycled
    hot: tuple[Template, ...] = ()  # requests repeated on purpose (cache hits)
    duplicate_fraction: float = 0.0
    source: str = "random"
    notes: tuple[str, ...] = field(default=())

    @property
    def mean_rows(self) -> float:
        return sum(t.rows for t in self.templates) / len(self.templates)


class RequestMaker:
    """Hands out the next request payload; one per worker process. ``next()`` returns (bytes, rows)."""

    def __init__(self, workload: Workload, worker: int, nonce: int, seed: int) -> None:
        self._templates = workload.templates
        self._hot = workload.hot
        self._dup = workload.duplicate_fraction if workload.hot else 0.0
        self._rng = random.Random(seed * 1_000_003 + worker)
        self._worker = worker + 1  # hot requests carry worker 0
        self._nonce = nonce
        self._i = 0
        self._counter = 0

    def next(self) -> tuple[bytes, int]:
        if self._dup and self._rng.random() < self._dup:
            t = self._hot[self._rng.randrange(len(self._hot))]
            return t.payload, t.rows
        t = self._templates[self._i]
        self._i = (self._i + 1) % len(self._templates)
        if t.stamp_at < 0:
            return t.payload, t.rows
        self._counter += 1
        return stamp(t, self._nonce, self._worker, self._counter), t.rows


def stamp(t: Template, nonce: int, worker: int, counter: int) -> bytes:
    limit = _STAMP_LIMIT[t.stamp_format]
    mark = struct.pack("<" + t.stamp_format * 3, nonce % limit, worker % limit, counter % limit)
    return t.payload[: t.stamp_at] + mark + t.payload[t.stamp_at + len(mark) :]


def parse_rows(text: str, max_batch_size: int) -> tuple[int, ...]:
    """``--rows``: ``N``, a comma list (``1,4,16``: each request picks one) or ``mixed`` (1..16, powers of two)."""
    if text == "mixed":
        rows = tuple(r for r in MIXED_ROWS if r <= max(max_batch_size, 1))
    else:
        rows = tuple(int(x) for x in text.split(","))
    if max_batch_size == 0:
        return (1,)
    bad = [r for r in rows if not 1 <= r <= max_batch_size]
    if bad:
        raise ValueError(f"--rows {text}: every row count must be in 1..{max_batch_size} (max_batch_size)")
    return rows


def build(
    model: ModelSpec,
    rows: Sequence[int],
    source: str = "random",
    *,
    duplicate_fraction: float = 0.0,
    seed: int = 0,
) -> Workload:
    """Serialize the requests for ``source``: ``random``, ``zeros`` or a path to ``.npy``, ``.npz`` or ``.json``."""
    if not 0 <= duplicate_fraction <= 1:
        raise ValueError(f"--duplicate-fraction must be in 0..1, got {duplicate_fraction}")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    if source in ("random", "zeros"):
        bodies = [
            ({i.name: _synthetic(i, r, model, rng, source == "zeros") for i in model.inputs}, r)
            for r in rows
            for _ in range(VARIANTS_PER_ROWS if source == "random" else 1)
        ]
        first = model.inputs[0]
        stampable = first.datatype in STAMPABLE and int(np.prod(first.row_shape, dtype=np.int64)) >= 3
        if not stampable:
            notes.append(f"input {first.name} ({first.datatype}) cannot be stamped: repeated requests may hit a cache")
        templates = tuple(_template(model, arrays, r, stamp=stampable) for arrays, r in bodies)
        hot = tuple(
            Template(stamp(t, 0, 0, k), t.rows) if stampable else t
            for k, t in enumerate(templates[: max(HOT_REQUESTS, 1)], start=1)
        )
    else:
        path = Path(source)
        bodies = _from_file(path, model, rows)
        templates = tuple(_template(model, arrays, r, stamp=False) for arrays, r in bodies)
        hot = templates[:HOT_REQUESTS]
        notes.append(f"inputs from {path.name}: {len(templates)} distinct requests, sent verbatim and cycled")
    return Workload(
        model=model.name,
        version=model.version,
        templates=templates,
        hot=hot if duplicate_fraction > 0 else (),
        duplicate_fraction=duplicate_fraction,
        source=source,
        notes=tuple(notes),
    )


def _shape(i: InputSpec, rows: int, model: ModelSpec) -> tuple[int, ...]:
    row_shape = tuple(1 if d < 0 else d for d in i.row_shape)  # a variable dimension is sent as 1
    return (rows, *row_shape) if model.max_batch_size > 0 else row_shape


def _synthetic(i: InputSpec, rows: int, model: ModelSpec, rng: np.random.Generator, zeros: bool) -> np.ndarray:
    shape = _shape(i, rows, model)
    dtype = DATATYPES[i.datatype].dtype
    if i.datatype == "BYTES":
        return np.full(shape, b"" if zeros else b"ferry-loadtest", dtype=object)
    if zeros:
        return np.zeros(shape, dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    return rng.integers(0, 100, shape).astype(dtype)


def _template(model: ModelSpec, arrays: Mapping[str, np.ndarray], rows: int, *, stamp: bool) -> Template:
    head = pb.ModelInferRequest(model_name=model.name, model_version=model.version)
    raws: list[bytes] = []
    for spec in model.inputs:
        a = arrays[spec.name]
        head.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(a.shape))
        raws.append(to_raw(a, DATATYPES[spec.datatype]))
    prefix = len(head.SerializeToString())
    head.raw_input_contents.extend(raws)
    payload = head.SerializeToString()
    if not stamp:
        return Template(payload, rows)
    # raw_input_contents (field 7) is the last field written: its first element follows the prefix, its tag and
    # its length varint.
    at = prefix + 1 + len(_varint(len(raws[0])))
    if payload[at : at + len(raws[0])] != raws[0]:
        raise AssertionError("raw_input_contents is not where the stamp expects it")
    return Template(payload, rows, at, STAMPABLE[model.inputs[0].datatype])


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _from_file(path: Path, model: ModelSpec, rows: Sequence[int]) -> list[tuple[dict[str, np.ndarray], int]]:
    if not path.exists():
        raise ValueError(f"--inputs {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _from_json(path, model)
    if suffix == ".npy":
        if len(model.inputs) != 1:
            raise ValueError(f"--inputs {path.name}: a .npy file feeds one input, {model.name} has {len(model.inputs)}")
        pools = {model.inputs[0].name: np.load(path, allow_pickle=False)}
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            missing = [i.name for i in model.inputs if i.name not in npz.files]
            if missing:
                raise ValueError(f"--inputs {path.name}: no array for input(s) {missing}; it has {npz.files}")
            pools = {i.name: npz[i.name] for i in model.inputs}
    else:
        raise ValueError(f"--inputs {path.name}: expected random, zeros, .npy, .npz or .json")
    if model.max_batch_size == 0:
        n = min(len(p) for p in pools.values())
        return [({k: p[j] for k, p in pools.items()}, 1) for j in range(min(n, 64))]
    n = min(len(p) for p in pools.values())
    if n == 0:
        raise ValueError(f"--inputs {path.name}: no rows")
    out = []
    for r in rows:
        for j in range(max(1, min(n // r, 64))):
            idx = np.arange(j * r, (j + 1) * r) % n
            out.append(({k: p[idx] for k, p in pools.items()}, r))
    return out


def _from_json(path: Path, model: ModelSpec) -> list[tuple[dict[str, np.ndarray], int]]:
    """perf_analyzer's ``--input-data`` layout: ``{"data": [{"INPUT": [...] | {"content": [...], "shape": [...]}}]}``
    (a bare list of such objects also works); one entry is one request."""
    doc: Any = json.loads(path.read_text())
    entries = doc["data"] if isinstance(doc, dict) else doc
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--inputs {path.name}: expected a non-empty list of requests (or {{'data': [...]}})")
    out = []
    for k, entry in enumerate(entries):
        arrays: dict[str, np.ndarray] = {}
        rows = 1
        for spec in model.inputs:
            if spec.name not in entry:
                raise ValueError(f"--inputs {path.name}: request {k} has no input {spec.name!r}")
            value = entry[spec.name]
            content, shape = (value["content"], value.get("shape")) if isinstance(value, dict) else (value, None)
            dtype = DATATYPES[spec.datatype].dtype
            flat = np.asarray(content, dtype=object if spec.datatype == "BYTES" else dtype).ravel()
            row_elems = int(np.prod([1 if d < 0 else d for d in spec.row_shape], dtype=np.int64))
            if shape is None:
                if model.max_batch_size > 0:
                    shape = [flat.size // row_elems, *(1 if d < 0 else d for d in spec.row_shape)]
                else:
                    shape = list(spec.row_shape)
            arrays[spec.name] = flat.reshape(shape)
            if model.max_batch_size > 0:
                rows = int(shape[0])
        out.append((arrays, rows))
    return out

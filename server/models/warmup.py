"""Warmup samples: what a model version runs before it reports ready (Triton's ``model_warmup``).

A version is published only after its warmup ran (DESIGN "build, warm, then publish"): the first real request must
not pay for onnxruntime's first-run allocations or a kernel's compilation, and a graph that loads but cannot run
fails its load instead of its first requests.

- With ``model_warmup`` in ``config.pbtxt``, each entry runs ``count`` times (0 counts as 1) as Triton defines it:
  ``batch_size`` rows (a model without batching takes 1 and its inputs have no batch dimension), each input
  ``zero_data``, ``random_data`` (a fixed seed) or ``input_data_file`` (raw bytes, read from the model's
  ``warmup/`` folder; for BYTES each element a 4-byte little-endian length, then the bytes).
- Without it, Ferry runs zeros once at batch 1 and once at the largest ``preferred_batch_size`` (when it has one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import InvalidArgument
from ferry.client.tensors import DATATYPES
from ferry.server.models.modelconfig import TensorSpec

_BY_CONFIG_TYPE = {d.config_type: d for d in DATATYPES.values()}
MAX_WARMUP_RUNS = 1000
"""Runs one version's warmup may ask for (entries times count): a config is trusted, but a typo must not keep a
load busy for hours."""
MAX_WARMUP_BYTES = 256 << 20
"""Bytes one warmup sample's inputs may take (the whole batch)."""


@dataclass(frozen=True, slots=True)
class WarmupSample:
    """One warmup entry: the feeds of one request, run ``count`` times."""

    name: str
    feeds: dict[str, np.ndarray]
    count: int


def warmup_samples(config: mc.ModelConfig, inputs: list[TensorSpec], model_dir: Path) -> list[WarmupSample]:
    """The samples a completed config warms with (its ``model_warmup``, or Ferry's default)."""
    if config.model_warmup:
        samples = [_declared(config, entry, inputs, model_dir) for entry in config.model_warmup]
        runs = sum(s.count for s in samples)
        if runs > MAX_WARMUP_RUNS:
            raise InvalidArgument(f"model {config.name!r} model_warmup: {runs} runs asked, at most {MAX_WARMUP_RUNS}")
        return samples
    sizes = [1]
    preferred = list(config.dynamic_batching.preferred_batch_size) if config.HasField("dynamic_batching") else []
    if config.max_batch_size > 0 and preferred and max(preferred) > 1:
        sizes.append(max(preferred))
    required = [t for t in inputs if not t.optional]
    return [
        WarmupSample(
            f"default batch {rows}",
            {t.name: _zeros(t, _shape(config, rows, [1 if d < 0 else d for d in t.dims])) for t in required},
            1,
        )
        for rows in sizes
    ]


def _declared(config: mc.ModelConfig, entry: mc.ModelWarmup, inputs: list[TensorSpec], model_dir: Path) -> WarmupSample:
    where = f"model {config.name!r} model_warmup {entry.name!r}"
    batching = config.max_batch_size > 0
    rows = entry.batch_size or 1
    if batching and rows > config.max_batch_size:
        raise InvalidArgument(f"{where}: batch_size {rows} is over max_batch_size {config.max_batch_size}")
    if not batching and rows != 1:
        raise InvalidArgument(f"{where}: batch_size must be 1 for a model without batching (max_batch_size 0)")
    by_name = {t.name: t for t in inputs}
    for name in entry.inputs:
        if name not in by_name:
            raise InvalidArgument(f"{where}: input {name!r} is not an input of the model ({sorted(by_name)})")
    missing = sorted(t.name for t in inputs if not t.optional and t.name not in entry.inputs)
    if missing:
        raise InvalidArgument(f"{where}: no data for inputs {missing}")
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for name, given in entry.inputs.items():
        spec = by_name[name]
        what = f"{where} input {name!r}"
        datatype = _BY_CONFIG_TYPE.get(mc.DataType.Name(given.data_type))
        if datatype is None or datatype.name != spec.datatype.name:
            raise InvalidArgument(
                f"{what}: data_type {mc.DataType.Name(given.data_type)} differs from the model's "
                f"{spec.datatype.config_type}"
            )
        dims = list(given.dims)
        if len(dims) != len(spec.dims) or any(
            d < 0 or (s >= 0 and d != s) for d, s in zip(dims, spec.dims, strict=True)
        ):
            raise InvalidArgument(f"{what}: dims {dims} do not fit the model's {list(spec.dims)}")
        shape = _shape(config, rows, dims)
        if int(np.prod(shape)) * max(spec.datatype.itemsize, 1) > MAX_WARMUP_BYTES:
            raise InvalidArgument(f"{what}: shape {shape} is over {MAX_WARMUP_BYTES} bytes")
        kind = given.WhichOneof("input_data_type")
        if kind == "random_data":
            feeds[name] = _random(spec, shape, rng)
        elif kind == "input_data_file":
            feeds[name] = _from_file(spec, shape, model_dir, given.input_data_file, what)
        else:  # zero_data, or nothing said: zeros (Triton requires one; zeros are what an unset choice reads as)
            feeds[name] = _zeros(spec, shape)
    return WarmupSample(entry.name, feeds, max(entry.count, 1))


def _shape(config: mc.ModelConfig, rows: int, dims: list[int]) -> list[int]:
    return [rows, *dims] if config.max_batch_size > 0 else dims


def _zeros(spec: TensorSpec, shape: list[int]) -> np.ndarray:
    if spec.datatype.name == "BYTES":
        return np.full(shape, b"", dtype=object)
    return np.zeros(shape, dtype=spec.datatype.dtype)


def _random(spec: TensorSpec, shape: list[int], rng: np.random.Generator) -> np.ndarray:
    name = spec.datatype.name
    if name == "BYTES":
        return np.array([str(v).encode() for v in rng.integers(0, 1000, int(np.prod(shape)))], dtype=object).reshape(
            shape
        )
    if name == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = np.dtype(spec.datatype.dtype)
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, 100, shape).astype(dtype)


def _from_file(spec: TensorSpec, shape: list[int], model_dir: Path, filename: str, what: str) -> np.ndarray:
    folder = (model_dir / "warmup").resolve()
    path = (folder / filename).resolve()
    if not path.is_relative_to(folder):
        raise InvalidArgument(f"{what}: input_data_file {filename!r} is outside the model's warmup/ folder")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InvalidArgument(f"{what}: cannot read input_data_file {str(path)!r}: {err}") from None
    count = int(np.prod(shape))
    if spec.datatype.name == "BYTES":
        items: list[bytes] = []
        offset = 0
        while offset < len(data) and len(items) < count:
            if offset + 4 > len(data):
                raise InvalidArgument(f"{what}: {filename!r} ends inside a length prefix")
            (length,) = struct.unpack_from("<I", data, offset)
            items.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
        if len(items) != count or offset > len(data):
            raise InvalidArgument(f"{what}: {filename!r} holds {len(items)} elements, the shape {shape} needs {count}")
        return np.array(items, dtype=object).reshape(shape)
    dtype = np.dtype(spec.datatype.dtype)
    need = count * dtype.itemsize
    if len(data) < need:
        raise InvalidArgument(f"{what}: {filename!r} has {len(data)} bytes, the shape {shape} needs {need}")
    return np.frombuffer(data[:need], dtype=dtype).reshape(shape).copy()


__all__ = ["MAX_WARMUP_RUNS", "WarmupSample", "warmup_samples"]

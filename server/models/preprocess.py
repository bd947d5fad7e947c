"""Per-model preprocessing: declared in ``<model>/preprocess.json``, validated at load, run on every formed batch.

The declaration maps graph input names to a chain of steps (README, "Preprocessing"). Clients send the chain's
input (e.g. ``UINT8 [-1, 64, 64, 3]``), which is what the completed config and ``ModelMetadata`` report; the
onnxruntime session gets the chain's output. A model version uses the pipeline in three calls:

1. ``Pipeline.load(model_dir, config)`` parses and checks the file (None when there is none);
2. ``client_inputs(graph_inputs)`` binds the chains to the graph, checking types, ranks and sizes, and returns the
   inputs as clients send them;
3. ``warmup()`` compiles (or loads from Numba's cache) and runs every kernel, before the version reports ready.

Then ``pipeline(feeds)`` runs in the version's worker thread on each concatenated batch. Every declaration error is
an ``InvalidArgument`` naming the model, the input, the step and the parameter.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ferry.client._proto import model_config_pb2 as mc
from ferry.client.errors import Internal, InvalidArgument
from ferry.kernels.hashing import hash_buckets, pack_strings
from ferry.kernels.image import ImageSpec, image_to_nchw
from ferry.kernels.tabular import STEP_CODES, FeatureSteps, feature_map, one_hot
from ferry.server.models.modelconfig import GraphTensor

PREPROCESS_FILE = "preprocess.json"
FLOAT, UINT8, INT64, STRING = "tensor(float)", "tensor(uint8)", "tensor(int64)", "tensor(string)"

Dims = tuple[int | None, ...]  # one row's dims (the batch dimension excluded); None = any size
Kernel = Callable[[np.ndarray], np.ndarray]

# Each op's parameters: name -> (kind, default); a default of ... marks a required parameter.
_REQUIRED: Any = ...
OPS: dict[str, dict[str, tuple[str, Any]]] = {
    "image": {
        "height": ("size", _REQUIRED),
        "width": ("size", _REQUIRED),
        "channels": ("size", 3),
        "resize": ("pair", None),
        "crop": ("pair", None),
        "scale": ("number", 1.0),
        "mean": ("vector", None),
        "std": ("vector", None),
        "input_order": ("text", "RGB"),
        "output_order": ("text", "RGB"),
    },
    "impute": {"fill": ("vector", _REQUIRED)},
    "clip": {"min": ("vector", -math.inf), "max": ("vector", math.inf)},
    "standardize": {"mean": ("vector", _REQUIRED), "std": ("vector", _REQUIRED)},
    "minmax": {"min": ("vector", _REQUIRED), "max": ("vector", _REQUIRED)},
    "one_hot": {"cardinalities": ("sizes", _REQUIRED)},
    "hash": {"buckets": ("size", _REQUIRED), "seed": ("integer", 0)},
}
# The per-feature ops, and the names of their parameter vectors in the order ferry.kernels.tabular takes them.
_FEATURE_OPS = {"impute": ("fill",), "clip": ("min", "max"), "standardize": ("mean", "std"), "minmax": ("min", "max")}
assert set(_FEATURE_OPS) == set(STEP_CODES)


class DeclarationError(InvalidArgument):
    """A preprocess.json that cannot be served."""


@dataclass(frozen=True, slots=True)
class _Fail:
    """Makes the error of one stage: ``fail(why)``, or ``fail(why, where)`` for one step of a fused stage."""

    prefix: str
    where: str

    def __call__(self, why: str, where: str | None = None) -> DeclarationError:
        return DeclarationError(f"{self.prefix}: {where or self.where}: {why}")


@dataclass(frozen=True, slots=True)
class Stage:
    """One kernel call of a chain: consecutive per-feature steps fuse into one ``features`` stage."""

    op: str  # image | features | one_hot | hash
    where: str  # for messages: "input 'x' step 2 (standardize)" (the first step of a fused stage)
    params: dict[str, Any]
    steps: tuple[tuple[str, dict[str, Any], str], ...] = ()  # features: the (op, params, where) it fuses

    @property
    def in_type(self) -> str:
        return {"image": UINT8, "features": FLOAT, "one_hot": INT64, "hash": STRING}[self.op]

    @property
    def out_type(self) -> str:
        return INT64 if self.op == "hash" else FLOAT

    def ranks(self) -> tuple[int, int]:
        return (3, 3) if self.op == "image" else (1, 1)

    def constrain(self, a: Dims, b: Dims, fail: _Fail) -> tuple[Dims, Dims]:
        """The dims before and after this stage, narrowed by what the stage fixes (raises on a contradiction)."""
        p = self.params
        if self.op == "image":
            spec: ImageSpec = p["spec"]
            return _unify(a, spec.input_shape, fail, "input"), _unify(b, spec.output_shape, fail, "output")
        if self.op == "one_hot":
            cards = p["cardinalities"]
            return _unify(a, (len(cards),), fail, "input"), _unify(b, (sum(cards),), fail, "output")
        width = _unify(a, b, fail, "input")
        if width == (None,):  # else kernel() checks every vector against the known width, naming the step
            width = (self._width(),)
        return width, width

    def _width(self) -> int | None:
        """The feature count the stage's vectors imply (None if they are all scalars)."""
        sizes = {np.size(v) for _, params, _ in self.steps for v in params.values() if np.ndim(v) > 0}
        return sizes.pop() if len(sizes) == 1 else None

    def kernel(self, dims: Dims, fail: _Fail) -> Kernel:
        """The batch function of this stage once its dims are known."""
        p = self.params
        if self.op == "image":
            spec = p["spec"]
            return lambda x: image_to_nchw(x, spec)
        if self.op == "one_hot":
            cards = np.asarray(p["cardinalities"], dtype=np.int64)
            return lambda x: one_hot(x, cards)
        if self.op == "hash":
            buckets, seed = p["buckets"], p["seed"]

            def hashed(x: np.ndarray) -> np.ndarray:
                data, offsets = pack_strings(x.reshape(-1))
                return hash_buckets(data, offsets, buckets, seed).reshape(x.shape)

            return hashed
        (width,) = dims
        if width is None:
            raise fail("the number of features is unknown: give a vector of statistics or fix the graph's width")
        built = []
        for op, params, where in self.steps:
            vectors = []
            for name in _FEATURE_OPS[op]:
                value = np.asarray(params[name], dtype=np.float32)
                if value.ndim == 0:
                    value = np.full(width, value, dtype=np.float32)
                elif value.shape != (width,):
                    raise fail(f"{name} has {value.size} values, the input has {width} features", where)
                vectors.append(value)
            try:  # each step on its own first, so that an error names its step
                FeatureSteps.build([(op, vectors)], width)
            except ValueError as err:
                raise fail(str(err), where) from None
            built.append((op, vectors))
        steps = FeatureSteps.build(built, width)
        return lambda x: feature_map(x, steps)


@dataclass(slots=True)
class _Chain:
    stages: list[Stage]
    kernels: list[Kernel]
    client: GraphTensor | None = None  # set by binding
    graph: GraphTensor | None = None


class Pipeline:
    """The preprocessing of one model: a chain of kernel stages per declared graph input."""

    def __init__(self, model: str, chains: dict[str, list[Stage]]) -> None:
        self.model = model
        self._chains = {name: _Chain(stages, []) for name, stages in chains.items()}
        self._bound = False

    @classmethod
    def load(cls, model_dir: Path, config: mc.ModelConfig) -> Pipeline | None:
        """The pipeline declared in ``model_dir/preprocess.json``, or None when there is no such file."""
        path = model_dir / PREPROCESS_FILE
        if not path.is_file():
            return None
        model = config.name or model_dir.name
        prefix = f"model {model!r} {PREPROCESS_FILE}"
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DeclarationError(f"{prefix}: cannot read it: {err}") from None
        if not isinstance(doc, dict) or set(doc) != {"inputs"} or not isinstance(doc["inputs"], dict):
            raise DeclarationError(f'{prefix}: expected an object {{"inputs": {{"<graph input>": [steps]}}}}')
        chains = {}
        for name, steps in doc["inputs"].items():
            if not isinstance(steps, list) or not steps:
                raise DeclarationError(f"{prefix}: input {name!r}: expected a non-empty list of steps")
            chains[name] = _parse_chain(name, steps, model_dir, prefix)
        return cls(model, chains)

    def client_inputs(self, graph_inputs: list[GraphTensor]) -> list[GraphTensor]:
        """Bind the chains to the graph's inputs; returns the inputs in graph order as clients send them."""
        by_name = {t.name: t for t in graph_inputs}
        for name, chain in self._chains.items():
            graph = by_name.get(name)
            if graph is None:
                raise DeclarationError(
                    f"model {self.model!r} {PREPROCESS_FILE}: input {name!r} is not in the ONNX graph, "
                    f"whose inputs are {sorted(by_name)}"
                )
            chain.graph = graph
            chain.client, chain.kernels = self._bind(name, chain.stages, graph)
        self._bound = True
        return [self._chains[t.name].client or t if t.name in self._chains else t for t in graph_inputs]

    def _bind(self, name: str, stages: list[Stage], graph: GraphTensor) -> tuple[GraphTensor, list[Kernel]]:
        def failing(stage: Stage) -> _Fail:
            return _Fail(f"model {self.model!r} {PREPROCESS_FILE}", stage.where)

        last = stages[-1]
        if graph.onnx_type != last.out_type:
            raise failing(last)(f"makes {last.out_type}, but graph input {name!r} is {graph.onnx_type}")
        if len(graph.shape) != last.ranks()[1] + 1:
            raise failing(last)(
                f"makes rows of rank {last.ranks()[1]}, but graph input {name!r} has shape "
                f"{_show(graph.shape)} (rank {len(graph.shape)}, with the batch dimension first)"
            )
        dims: list[Dims] = [(None,) * s.ranks()[0] for s in stages] + [graph.shape[1:]]
        for _ in range(2):  # forward then backward, twice: enough for sizes to reach every stage
            for i in [*range(len(stages)), *reversed(range(len(stages)))]:
                dims[i], dims[i + 1] = stages[i].constrain(dims[i], dims[i + 1], failing(stages[i]))
        kernels = [stage.kernel(dims[i], failing(stage)) for i, stage in enumerate(stages)]
        return GraphTensor(name, stages[0].in_type, (graph.shape[0], *dims[0])), kernels

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's feeds for a batch of client feeds (those without a chain pass through)."""
        out = dict(feeds)
        for name, chain in self._chains.items():
            x = out.get(name)
            if x is not None:
                for kernel in chain.kernels:
                    x = kernel(x)
                out[name] = x
        return out

    def warmup(self) -> None:
        """Compile (or load from Numba's cache) and run every kernel on dummy batches, writable (a concatenated
        batch) and read-only (a single request's arrays are views of the message), checking the shapes they make.
        A failure is ``Internal``: the version does not load, the other models still do."""
        if not self._bound:
            raise RuntimeError("bind the pipeline with client_inputs() before warmup()")
        for rows, writable in ((2, True), (1, False)):
            feeds = {name: _dummy(chain.client, rows, writable) for name, chain in self._chains.items() if chain.client}
            try:
                made = self(feeds)
            except Exception as err:  # a kernel that does not compile or run here: a bug, not a bad declaration
                raise Internal(f"model {self.model!r}: preprocessing failed its warmup: {err!r}") from err
            for name, array in made.items():
                graph = self._chains[name].graph
                assert graph is not None
                expected = (rows, *graph.shape[1:])
                if array.ndim != len(expected) or any(
                    e not in (None, d) for e, d in zip(expected, array.shape, strict=True)
                ):
                    raise Internal(f"model {self.model!r}: preprocessing made {name!r} {array.shape}, not {expected}")


def _dummy(tensor: GraphTensor, rows: int, writable: bool) -> np.ndarray:
    shape = (rows, *(1 if d is None else d for d in tensor.shape[1:]))
    if tensor.onnx_type == STRING:
        array = np.full(shape, "warmup", dtype=object)
    else:
        array = np.zeros(shape, dtype={UINT8: np.uint8, FLOAT: np.float32, INT64: np.int64}[tensor.onnx_type])
    array.flags.writeable = writable
    return array


def _unify(have: Dims, fixed: Dims, fail: _Fail, side: str) -> Dims:
    """``have`` (what the graph or a neighbouring step requires) narrowed by what this stage fixes."""
    if len(have) != len(fixed) or any(h not in (None, f) and f is not None for h, f in zip(have, fixed, strict=True)):
        raise fail(f"its {side} rows of shape {_show(fixed)} do not fit the {_show(have)} required there")
    return tuple(f if h is None else h for h, f in zip(have, fixed, strict=True))


def _show(dims: Dims) -> str:
    return str([-1 if d is None else d for d in dims])


def _parse_chain(name: str, steps: list[Any], model_dir: Path, prefix: str) -> list[Stage]:
    stages: list[Stage] = []
    for i, raw in enumerate(steps, 1):
        op = raw.get("op") if isinstance(raw, dict) else None
        where = f"input {name!r} step {i}" + (f" ({op})" if isinstance(op, str) else "")
        if not isinstance(raw, dict) or not isinstance(op, str):
            raise DeclarationError(f'{prefix}: {where}: expected an object with an "op", got {raw!r}')
        if op not in OPS:
            raise DeclarationError(f"{prefix}: {where}: unknown op {op!r}; ops are {sorted(OPS)}")
        params = _parse_params(op, raw, model_dir, f"{prefix}: {where}")
        if op in _FEATURE_OPS:
            previous = stages[-1] if stages else None
            if previous is not None and previous.op == "features":  # fuse into one kernel call
                stages[-1] = replace(previous, steps=(*previous.steps, (op, params, where)))
            else:
                stages.append(Stage("features", where, {}, ((op, params, where),)))
        else:
            stages.append(Stage(op, where, params))
    for before, after in itertools.pairwise(stages):
        if before.out_type != after.in_type or before.ranks()[1] != after.ranks()[0]:
            raise DeclarationError(
                f"{prefix}: {after.where}: takes {after.in_type} rows of rank {after.ranks()[0]}, "
                f"but {before.where} makes {before.out_type} rows of rank {before.ranks()[1]}"
            )
    return stages


def _parse_params(op: str, raw: dict[str, Any], model_dir: Path, where: str) -> dict[str, Any]:
    schema = OPS[op]
    unknown = sorted(set(raw) - set(schema) - {"op"})
    if unknown:
        raise DeclarationError(f"{where}: unknown parameter {unknown[0]!r}; {op} takes {list(schema)}")
    if op == "clip" and not {"min", "max"} & set(raw):
        raise DeclarationError(f"{where}: clip needs min, max or both")
    params: dict[str, Any] = {}
    for key, (kind, default) in schema.items():
        if key not in raw:
            if default is _REQUIRED:
                raise DeclarationError(f"{where}: missing parameter {key!r}")
            params[key] = default
        else:
            params[key] = _value(kind, raw[key], model_dir, f"{where}: {key}")
    if op == "image":
        image = {k: params.pop(k) for k in list(params)}
        try:
            params["spec"] = ImageSpec.build(**image)
        except ValueError as err:
            raise DeclarationError(f"{where}: {err}") from None
    if op == "hash" and not params["buckets"] <= 2**32:
        raise DeclarationError(f"{where}: buckets must be at most 2**32 (the hash has 32 bits)")
    return params


def _value(kind: str, value: Any, model_dir: Path, where: str) -> Any:
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def integer(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "integer" and integer(value):
        return value
    if kind == "size" and integer(value) and value >= 1:
        return value
    if kind == "number" and number(value):
        return float(value)
    if kind == "text" and isinstance(value, str):
        return value
    if kind == "pair" and integer(value) and value >= 1:
        return (value, value)
    if kind == "pair" and isinstance(value, list) and len(value) == 2 and all(integer(v) and v >= 1 for v in value):
        return tuple(value)
    if kind == "sizes" and isinstance(value, list) and value and all(integer(v) and v >= 1 for v in value):
        return list(value)
    if kind == "vector":
        if number(value):
            return float(value)
        if isinstance(value, list) and value and all(number(v) for v in value):
            return np.asarray(value, dtype=np.float32)
        if isinstance(value, str):
            return _stored_vector(value, model_dir, where)
    expected = {
        "integer": "an integer",
        "size": "an integer >= 1",
        "number": "a number",
        "text": "a string",
        "pair": "an integer >= 1 or a list [height, width] of them",
        "sizes": "a non-empty list of integers >= 1",
        "vector": 'a number, a list of numbers, or "file.npz:array" / "file.npy" in the model directory',
    }[kind]
    raise DeclarationError(f"{where}: expected {expected}, got {value!r}")


def _stored_vector(ref: str, model_dir: Path, where: str) -> np.ndarray:
    """A 1-D array stored beside the model: ``"stats.npz:mean"`` or ``"mean.npy"``."""
    file, _, key = ref.partition(":")
    path = model_dir / file
    if Path(file).is_absolute() or ".." in Path(file).parts or not file.endswith((".npz", ".npy")):
        raise DeclarationError(f"{where}: {ref!r} must name a .npz or .npy file inside the model directory")
    if not path.is_file():
        raise DeclarationError(f"{where}: file {file!r} not found in {model_dir}")
    if file.endswith(".npy") == bool(key):
        raise DeclarationError(f'{where}: write "file.npz:array" for an array in a .npz, "file.npy" for a .npy')
    try:
        if not key:
            array = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as stored:
                if key not in stored.files:
                    raise DeclarationError(f"{where}: {file!r} has no array {key!r} (it has {sorted(stored.files)})")
                array = stored[key]
    except (OSError, ValueError) as err:
        raise DeclarationError(f"{where}: cannot read {file!r}: {err}") from None
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
        raise DeclarationError(f"{where}: {ref!r} must be a 1-D numeric array, got {array.dtype} {list(array.shape)}")
    return array.astype(np.float32)

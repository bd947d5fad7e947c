"""A minimal MLServer runtime for one ONNX file: the baseline Ferry is compared with (``benchmarks.mlserver.compare``).

Runs inside MLServer's own venv (``benchmarks/mlserver/setup.sh``), never in Ferry's. It does what a user of MLServer
would write for an ONNX model: decode the V2 input with MLServer's ``NumpyCodec``, ``session.run`` inline on the
event loop (as MLServer's own sklearn/xgboost runtimes call their models), encode every output as a tensor named
like the ONNX output (``output``). MLServer's adaptive batcher (``max_batch_size`` / ``max_batch_time`` in
model-settings.json) concatenates requests along dimension 0 before ``predict`` and splits the outputs after it.

``parameters.extra`` of the model settings may set ``intra_op_threads`` (default: all cores, as Ferry's default for
one instance) and ``allow_spinning`` (default false, as Ferry: idle onnxruntime threads sleep instead of spinning on
the cores the event loop needs).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        extra = (self._settings.parameters.extra if self._settings.parameters else None) or {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("intra_op_threads", os.cpu_count() or 1))
        if str(extra.get("allow_spinning", "false")).lower() not in ("1", "true"):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name: np.dtype(_ORT_DTYPES.get(i.type, "float32")) for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for request_input in payload.inputs:
            if request_input.name not in self._inputs:
                raise ValueError(f"unknown input {request_input.name!r}; the model has {sorted(self._inputs)}")
            array = NumpyCodec.decode_input(request_input)
            feeds[request_input.name] = array.astype(self._inputs[request_input.name], copy=False)
        results = self._session.run(self._outputs, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, value) for name, value in zip(self._outputs, results, strict=True)],
        )


_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}

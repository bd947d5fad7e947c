"""KServe's Python REST client (``kserve.InferenceRESTClient``, protocol v2) against a Ferry server: run inside
``.venv-kserve`` (KServe pins protobuf < 7) by tests/integration/test_rest_kserve.py, which checks what it prints.

    .venv-kserve/bin/python tests/kserve/drive.py http://127.0.0.1:PORT

Prints one JSON object: readiness, liveness, and the outputs of ``tiny`` for an input of 0.5s, sent as JSON and as
binary tensor data; a failed call exits non-zero with its error.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base: str) -> dict[str, object]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        out: dict[str, object] = {
            "server_live": await client.is_server_live(base),
            "server_ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, "tiny"),
        }
        x = np.full((2, 16), 0.5, dtype=np.float32)
        for binary in (False, True):
            tensor = InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            request = InferRequest(model_name="tiny", infer_inputs=[tensor], request_id=f"kserve-{binary}")
            response = await client.infer(base, request, model_name="tiny")
            (output,) = response.outputs
            out["binary" if binary else "json"] = {
                "id": response.id,
                "name": output.name,
                "shape": list(output.shape),
                "data": output.as_numpy().reshape(-1).tolist(),
            }
        return out
    finally:
        await client.close()


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))

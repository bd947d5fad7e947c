"""KServe's Python REST client (``kserve.InferenceRESTClient`` 0.21, protocol v2) against Ferry's REST API:
readiness and liveness (KServe parses their JSON bodies), and inference with JSON and with binary tensor data.

KServe pins protobuf < 7, so it lives in its own venv, ``.venv-kserve`` (``make kserve-deps``); the client runs there
(``tests/kserve/drive.py``) and prints what it got. Without that venv the test skips, saying why, except under
``CI=true``, where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.serving import background_server

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv-kserve" / "bin" / "python"


@pytest.fixture(scope="module")
def base_url(example_repo: Path) -> Iterator[str]:
    if not PYTHON.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{PYTHON} is missing: make kserve-deps must have made it")
        pytest.skip(f"{PYTHON} is missing (make kserve-deps makes it)")
    with background_server(example_repo) as running:
        yield f"http://127.0.0.1:{running.server.http_port}"


def test_kserve_rest_client(base_url: str, example_repo: Path) -> None:
    proc = subprocess.run([str(PYTHON), str(ROOT / "tests" / "kserve" / "drive.py"), base_url], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout)
    assert (seen["server_live"], seen["server_ready"], seen["model_ready"]) == (True, True, True)
    session = ort.InferenceSession(str(example_repo / "tiny" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"input": np.full((2, 16), 0.5, np.float32)})
    for form in ("json", "binary"):
        out = seen[form]
        assert out["id"] == f"kserve-{form == 'binary'}"
        assert (out["name"], out["shape"]) == ("output", [2, 4])
        np.testing.assert_allclose(out["data"], expected.reshape(-1), rtol=1e-5, atol=1e-6)

"""Ferry's client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio) over the Open Inference Protocol.

Importing it loads grpc, protobuf and numpy only (never onnxruntime, numba or the server)::

    from ferry.client import Client, NotFound

    with Client("127.0.0.1:8001", timeout_s=5.0) as client:
        outputs = client.infer("mlp", {"input": x})

Every failed call raises a ``FerryError`` subclass named after its gRPC status code.
"""

from ferry.client.client import AsyncClient, Client, ClientOptions, InferRequest, InferResult
from ferry.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FerryError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from ferry.client.outcomes import Outcome, OutcomeReport

__all__ = [
    "AsyncClient",
    "Cancelled",
    "Client",
    "ClientOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FerryError",
    "InferRequest",
    "InferResult",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Outcome",
    "OutcomeReport",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]

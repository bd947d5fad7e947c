"""Errors that carry a gRPC status code, shared by the server and the client SDK.

The server raises them from its domain code and one decorator turns them into a gRPC status; the client turns a
failed call back into the same class, so both sides speak one vocabulary::

    FerryError                      code UNKNOWN (base)
    ├── InvalidArgument             INVALID_ARGUMENT   bad tensors, shapes, datatypes, parameters
    ├── NotFound                    NOT_FOUND          unknown model or version
    ├── Unavailable                 UNAVAILABLE        model not ready, queue full, server stopping (retryable)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED  the caller's deadline passed before the answer
    ├── Cancelled                   CANCELLED          the caller went away
    ├── ResourceExhausted           RESOURCE_EXHAUSTED a size limit or quota
    ├── FailedPrecondition          FAILED_PRECONDITION
    ├── Unimplemented               UNIMPLEMENTED      an RPC or feature Ferry does not offer
    ├── Unauthenticated             UNAUTHENTICATED
    ├── PermissionDenied            PERMISSION_DENIED
    └── Internal                    INTERNAL           a bug or a model failure, never bad input
"""

from __future__ import annotations

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FerryError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_status",
]


class FerryError(Exception):
    """An error with a gRPC status code; ``str(err)`` is the status message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


class InvalidArgument(FerryError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(FerryError):
    code = grpc.StatusCode.NOT_FOUND


class Unavailable(FerryError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(FerryError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(FerryError):
    code = grpc.StatusCode.CANCELLED


class ResourceExhausted(FerryError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(FerryError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(FerryError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(FerryError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FerryError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(FerryError):
    code = grpc.StatusCode.INTERNAL


STATUS_CODE_PARAMETER = "ferry_status_code"
"""Stream error replies carry their status code's name here (``infer_response.parameters``, string_param), as
``ModelStreamInferResponse.error_message`` is text only; without it an item error is a plain FerryError."""

_BY_CODE: dict[grpc.StatusCode, type[FerryError]] = {cls.code: cls for cls in FerryError.__subclasses__()}


def error_for_status(code: grpc.StatusCode, message: str) -> FerryError:
    """The FerryError subclass for a status code (the base class for codes without one)."""
    err = _BY_CODE.get(code, FerryError)(message)
    if type(err) is FerryError:
        err.code = code
    return err

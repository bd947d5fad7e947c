from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(_message.Message):
    __slots__ = ("request_id", "model_name", "label", "target", "class_label", "row")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CLASS_LABEL_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model_name: str
    label: int
    target: float
    class_label: str
    row: int
    def __init__(self, request_id: _Optional[str] = ..., model_name: _Optional[str] = ..., label: _Optional[int] = ..., target: _Optional[float] = ..., class_label: _Optional[str] = ..., row: _Optional[int] = ...) -> None: ...

class ReportOutcomesRequest(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[Outcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[Outcome, _Mapping]]] = ...) -> None: ...

class ReportOutcomesResponse(_message.Message):
    __slots__ = ("matched", "unmatched", "unmatched_index")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_INDEX_FIELD_NUMBER: _ClassVar[int]
    matched: int
    unmatched: int
    unmatched_index: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, matched: _Optional[int] = ..., unmatched: _Optional[int] = ..., unmatched_index: _Optional[_Iterable[int]] = ...) -> None: ...

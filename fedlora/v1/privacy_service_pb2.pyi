from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetBudgetRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("device_id", "epsilon_spent", "epsilon_remaining", "epsilon_budget", "delta", "accountant", "rounds_trained", "runs", "budget_run", "policy_unit", "device_level")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_REMAINING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_TRAINED_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_RUN_FIELD_NUMBER: _ClassVar[int]
    POLICY_UNIT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_budget: float
    delta: float
    accountant: str
    rounds_trained: int
    runs: _containers.RepeatedScalarFieldContainer[str]
    budget_run: str
    policy_unit: str
    device_level: DeviceLevelBudget
    def __init__(self, device_id: _Optional[str] = ..., epsilon_spent: _Optional[float] = ..., epsilon_remaining: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., accountant: _Optional[str] = ..., rounds_trained: _Optional[int] = ..., runs: _Optional[_Iterable[str]] = ..., budget_run: _Optional[str] = ..., policy_unit: _Optional[str] = ..., device_level: _Optional[_Union[DeviceLevelBudget, _Mapping]] = ...) -> None: ...

class DeviceLevelBudget(_message.Message):
    __slots__ = ("epsilon_spent", "epsilon_remaining", "epsilon_budget", "delta", "accountant", "rounds", "runs")
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_REMAINING_FIELD_NUMBER: _ClassVar[int]
    EPSILON_BUDGET_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_budget: float
    delta: float
    accountant: str
    rounds: int
    runs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, epsilon_spent: _Optional[float] = ..., epsilon_remaining: _Optional[float] = ..., epsilon_budget: _Optional[float] = ..., delta: _Optional[float] = ..., accountant: _Optional[str] = ..., rounds: _Optional[int] = ..., runs: _Optional[_Iterable[str]] = ...) -> None: ...

class GetFleetReportRequest(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: str
    def __init__(self, run: _Optional[str] = ...) -> None: ...

class GetFleetReportResponse(_message.Message):
    __slots__ = ("run", "report_json")
    RUN_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    run: str
    report_json: str
    def __init__(self, run: _Optional[str] = ..., report_json: _Optional[str] = ...) -> None: ...

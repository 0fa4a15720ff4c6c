"""Sans-IO DIMSE message layer (PS3.7 over PS3.8 P-DATA) for the accelerated routes.

Sits on :mod:`relay_router.ul` (PDUs, association state): the receiver assembles
P-DATA-TF PDUs into command sets (decoded) and streamed data sets; the sender
fragments messages back to the peer's maximum PDU length; the command helpers build and
parse the command sets the routers answer with. No asyncio, grpc or socket imports.
The transparent relay does not use this package: it never parses a data set.
"""

from __future__ import annotations

from relay_router.dimse.commands import (
    STORAGE_COMMITMENT_PUSH,
    STORAGE_COMMITMENT_PUSH_INSTANCE,
    CommandField,
    MessageIdAllocator,
    Priority,
    Status,
    StoreRequest,
    c_echo_rq,
    c_echo_rsp,
    c_move_rsp,
    c_store_rq,
    c_store_rsp,
    commitment_event_information,
    encode_dataset,
    n_action_rsp,
    n_event_report_rq,
    parse_c_store_rq,
)
from relay_router.dimse.errors import DimseError, Violation
from relay_router.dimse.receiver import (
    CommandReceived,
    DatasetChunk,
    DatasetComplete,
    DimseEvent,
    DimseReceiver,
    decode_command,
)
from relay_router.dimse.sender import DEFAULT_FRAGMENT, MAX_FRAGMENT, DimseSender, encode_command

__all__ = [
    "DEFAULT_FRAGMENT",
    "MAX_FRAGMENT",
    "STORAGE_COMMITMENT_PUSH",
    "STORAGE_COMMITMENT_PUSH_INSTANCE",
    "CommandField",
    "CommandReceived",
    "DatasetChunk",
    "DatasetComplete",
    "DimseError",
    "DimseEvent",
    "DimseReceiver",
    "DimseSender",
    "MessageIdAllocator",
    "Priority",
    "Status",
    "StoreRequest",
    "Violation",
    "c_echo_rq",
    "c_echo_rsp",
    "c_move_rsp",
    "c_store_rq",
    "c_store_rsp",
    "commitment_event_information",
    "decode_command",
    "encode_command",
    "encode_dataset",
    "n_action_rsp",
    "n_event_report_rq",
    "parse_c_store_rq",
]

"""Small helpers over python-hl7 shared by the PIX client (pix.py) and the ADT listener (adt.py).

python-hl7 is used for parsing, escaping and its asyncio MLLP streams; these helpers only
read its irregular parse tree safely (a missing field is "", never an exception) and
build TLS contexts for MLLP.
"""

from __future__ import annotations

import datetime as dt
import secrets
import ssl
from pathlib import Path
from typing import Any

import hl7

# An empty message whose separators (| ^ ~ \ &) escape values we put into messages.
_SKELETON = hl7.parse("MSH|^~\\&|\r")


def escape(value: str) -> str:
    """`value` with HL7 delimiters and non-ASCII characters escaped (python-hl7's escape, HL7 v2.5 2.7)."""
    return str(_SKELETON.escape(value)) if value else ""


def value(segment: Any, field: int, repeat: int = 1, component: int = 1, subcomponent: int = 1) -> str | None:
    """One unescaped value of a parsed segment; None when that repetition/component is not there."""
    try:
        return str(segment.extract_field(1, field, repeat, component, subcomponent))
    except (IndexError, KeyError, TypeError):
        return None


def segment(message: Any, name: str) -> Any | None:
    try:
        return message.segment(name)
    except KeyError:
        return None


def timestamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S")


def control_id() -> str:
    """MSH-10: unique and unguessable (a reply must quote it in MSA-2)."""
    return secrets.token_hex(10)


def client_tls(ca_file: Path | None, cert_file: Path | None, key_file: Path | None) -> ssl.SSLContext | None:
    """TLS for an MLLP client: on when a CA is configured (BCP 195: TLS 1.2 at least)."""
    if ca_file is None:
        return None
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(str(cert_file), str(key_file))
    return context

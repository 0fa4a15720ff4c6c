"""Cross-checks against pynetdicom's own encoded PDU fixtures, and the sans-IO import rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ

from relay_router.ul import PduError, PduFramer, parse_associate

E = pytest.importorskip("pynetdicom.tests.encoded_pdu_items")

ASSOCIATE = [n for n in dir(E) if n.startswith(("a_associate_rq", "a_associate_ac"))]
PDATA = [n for n in dir(E) if n.startswith("p_data_tf") and isinstance(getattr(E, n), bytes)]


@pytest.mark.parametrize("name", ASSOCIATE)
def test_pynetdicom_associate_fixtures(name: str) -> None:
    data: bytes = getattr(E, name)
    if name in ("a_associate_rq_called", "a_associate_rq_calling"):  # all-space titles, which PS3.8 9.3.2 forbids
        with pytest.raises(PduError, match="all spaces"):
            parse_associate(data)
        return
    if name == "a_associate_ac_user":  # its PDU-length says 184 for 198 bytes; pynetdicom does not check
        with pytest.raises(PduError, match="PDU-length 184 does not match the 198 bytes"):
            parse_associate(data)
        return
    info = parse_associate(data)
    ref = A_ASSOCIATE_RQ() if data[0] == 1 else A_ASSOCIATE_AC()
    ref.decode(data)
    assert [pc.id for pc in info.presentation_contexts] == [pc.context_id for pc in ref.presentation_context]
    assert ref.user_information is not None
    assert info.max_pdu_length == ref.user_information.maximum_length
    assert info.implementation_class_uid == ref.user_information.implementation_class_uid
    if data[0] == 1:
        assert isinstance(ref, A_ASSOCIATE_RQ)
        assert info.called_ae == ref.called_ae_title.strip()
        assert info.abstract_syntaxes == tuple(dict.fromkeys(pc.abstract_syntax for pc in ref.presentation_context))


@pytest.mark.parametrize("name", PDATA)
def test_pynetdicom_pdata_fixtures(name: str) -> None:
    data: bytes = getattr(E, name)
    framer = PduFramer()
    assert b"".join(ev.data for ev in framer.feed(data)) == data
    assert framer.at_pdu_boundary


def test_ul_package_is_sans_io() -> None:
    forbidden = {"asyncio", "grpc", "socket", "threading", "selectors", "ssl", "concurrent", "multiprocessing"}
    package = Path(__file__).resolve().parents[3] / "relay_router" / "ul"
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"

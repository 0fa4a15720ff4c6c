"""DICOM audit messages (PS3.15 A.5) built with ElementTree.

The relay's audit events become the XML messages auditors' tools read (IHE ATNA
record repositories): the schema is PS3.15 A.5.1 (tests validate every builder
here against it), the event codes come from PS3.16 (DCM, CID 400-ish tables) as
PS3.15 A.5.3 uses them. One builder per message type; `from_record` maps the
relay's JSON audit records (relay_common.audit) onto them.

Quirks of the schema that shape the code: every coded value carries csd-code,
codeSystemName and originalText (originalText is mandatory there), and every
participant object carries a ParticipantObjectName or a ParticipantObjectQuery.
Values are XML-escaped by ElementTree; control characters, which XML 1.0 cannot
carry at all, are replaced before they reach it (peers choose AE titles).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# PS3.15 A.5.1 EventOutcomeIndicator: 0 success, 4 minor failure, 8 serious failure.
OUTCOME_INDICATOR = {"success": "0", "failure": "4", "alert": "8"}

# (code, codeSystemName, meaning) from PS3.16 (DCM) and RFC 3881.
Code = tuple[str, str, str]
EV_APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
EV_BEGIN_TRANSFERRING: Code = ("110102", "DCM", "Begin Transferring DICOM Instances")
EV_INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
EV_PATIENT_RECORD: Code = ("110110", "DCM", "Patient Record")
EV_QUERY: Code = ("110112", "DCM", "Query")
EV_SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
EV_USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
# Event type codes (PS3.16 CID 432, 433 and 436).
ET_APPLICATION_START: Code = ("110120", "DCM", "Application Start")
ET_APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
ET_LOGIN: Code = ("110122", "DCM", "Login")
ET_LOGOUT: Code = ("110123", "DCM", "Logout")
ET_NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
ET_NETWORK_CONFIGURATION: Code = ("110128", "DCM", "Network Configuration")
ET_SECURITY_CONFIGURATION: Code = ("110129", "DCM", "Security Configuration")
ET_USE_OF_RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
ET_USER_SECURITY_ATTRIBUTES_CHANGED: Code = ("110137", "DCM", "User Security Attributes Changed")
# Active participant roles (PS3.16 CID 402).
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER: Code = ("110151", "DCM", "Application Launcher")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
# Participant object ID types (RFC 3881 and PS3.16 CID 404).
ID_PATIENT_NUMBER: Code = ("2", "RFC-3881", "Patient Number")
ID_URI: Code = ("12", "RFC-3881", "URI")
ID_STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")
ID_NODE: Code = ("110182", "DCM", "Node ID")

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffe\uffff]")


def _clean(text: object) -> str:
    """Text that XML 1.0 can carry (control characters become U+FFFD)."""
    return _NOT_XML.sub("\ufffd", str(text))


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a process, node, AE or person (PS3.15 A.5.2.2)."""

    user_id: str  # the process or account (e.g. "relay-router@hospital-a", or an AE title)
    requestor: bool = False
    role: Code | None = None
    ae_titles: tuple[str, ...] = ()  # PS3.15 A.5.2.2: AlternativeUserID "AETITLES=A;B"
    user_name: str = ""
    network_access_point: str = ""  # host name or IP address

    def add_to(self, message: ET.Element) -> None:
        attrs = {"UserID": _clean(self.user_id) or "-", "UserIsRequestor": "true" if self.requestor else "false"}
        if self.ae_titles:
            attrs["AlternativeUserID"] = _clean("AETITLES=" + ";".join(self.ae_titles))
        if self.user_name:
            attrs["UserName"] = _clean(self.user_name)
        if self.network_access_point:
            point = self.network_access_point.strip("[]")
            attrs["NetworkAccessPointID"] = _clean(point)
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(point) else "1"
        element = ET.SubElement(message, "ActiveParticipant", attrs)
        if self.role is not None:
            _code(element, "RoleIDCode", self.role)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass
class StudyRecord:
    """One study that crossed an association (relay_router.studytap fills these)."""

    study_uid: str
    patient_id: str = ""
    patient_id_issuer: str = ""
    # SOP Class UID -> number of instances of it in this study on this association.
    sop_classes: dict[str, int] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(self.sop_classes.values())


def _message(
    event: Code, action: str, outcome: str, when: dt.datetime | None, description: str, types: Iterable[Code] = ()
) -> ET.Element:
    message = ET.Element("AuditMessage")
    when = when or dt.datetime.now(dt.UTC)
    ident = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": action,
            "EventDateTime": when.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": OUTCOME_INDICATOR.get(outcome, "4"),
        },
    )
    _code(ident, "EventID", event)
    for code in types:
        _code(ident, "EventTypeCode", code)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _clean(description)
    return message


def _source(message: ET.Element, source_id: str, site: str = "") -> None:
    attrs = {"AuditSourceID": _clean(source_id) or "-"}
    if site:
        attrs["AuditEnterpriseSiteID"] = _clean(site)
    source = ET.SubElement(message, "AuditSourceIdentification", attrs)
    # 4: application server process (PS3.15 A.5.1.2.1).
    ET.SubElement(source, "AuditSourceTypeCode", {"csd-code": "4"})


def _object(
    message: ET.Element,
    object_id: str,
    id_type: Code,
    *,
    type_code: str,
    role: str,
    name: str = "",
    query: bytes | None = None,
    details: Mapping[str, str] | None = None,
) -> ET.Element:
    attrs = {
        "ParticipantObjectID": _clean(object_id) or "-",
        "ParticipantObjectTypeCode": type_code,
        "ParticipantObjectTypeCodeRole": role,
    }
    element = ET.SubElement(message, "ParticipantObjectIdentification", attrs)
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    if query is not None:
        ET.SubElement(element, "ParticipantObjectQuery").text = base64.b64encode(query).decode()
    else:
        ET.SubElement(element, "ParticipantObjectName").text = _clean(name or object_id) or "-"
    for key, value in (details or {}).items():
        ET.SubElement(
            element,
            "ParticipantObjectDetail",
            {"type": _clean(key), "value": base64.b64encode(str(value).encode()).decode()},
        )
    return element


# --------------------------------------------------------------------------- the messages


def application_activity(
    *,
    source_id: str,
    app: Participant,
    started: bool,
    launcher: Participant | None = None,
    outcome: str = "success",
    description: str = "",
    when: dt.datetime | None = None,
) -> ET.Element:
    """Application Activity (PS3.15 A.5.3.1): the daemon started or stopped."""
    message = _message(
        EV_APPLICATION_ACTIVITY,
        "E",
        outcome,
        when,
        description,
        [ET_APPLICATION_START if started else ET_APPLICATION_STOP],
    )
    Participant(
        app.user_id, app.requestor, ROLE_APPLICATION, app.ae_titles, app.user_name, app.network_access_point
    ).add_to(message)
    if launcher is not None:
        Participant(
            launcher.user_id, True, ROLE_APPLICATION_LAUNCHER, (), launcher.user_name, launcher.network_access_point
        ).add_to(message)
    _source(message, source_id)
    return message


def instances_transferred(
    *,
    source_id: str,
    source: Participant,
    destination: Participant,
    studies: Iterable[StudyRecord],
    others: Iterable[Participant] = (),
    begin: bool = False,
    action: str = "R",
    outcome: str = "success",
    description: str = "",
    when: dt.datetime | None = None,
    site: str = "",
) -> ET.Element:
    """DICOM Instances Transferred (A.5.3.4) or, with begin=True, Begin Transferring (A.5.3.2).

    One study object per study (its SOP classes and instance counts) and one patient
    object per distinct patient ID. Action "R" for the sender's view, "C" for the receiver's.
    """
    event = EV_BEGIN_TRANSFERRING if begin else EV_INSTANCES_TRANSFERRED
    message = _message(event, "E" if begin else action, outcome, when, description)
    Participant(
        source.user_id, source.requestor, ROLE_SOURCE, source.ae_titles, source.user_name, source.network_access_point
    ).add_to(message)
    Participant(
        destination.user_id,
        destination.requestor,
        ROLE_DESTINATION,
        destination.ae_titles,
        destination.user_name,
        destination.network_access_point,
    ).add_to(message)
    for other in others:
        other.add_to(message)
    _source(message, source_id, site)
    patients: dict[tuple[str, str], None] = {}
    for study in studies:
        element = _object(message, study.study_uid, ID_STUDY_INSTANCE_UID, type_code="2", role="3")
        description_element = ET.SubElement(element, "ParticipantObjectDescription")
        for sop_class, count in sorted(study.sop_classes.items()):
            ET.SubElement(description_element, "SOPClass", {"UID": _clean(sop_class), "NumberOfInstances": str(count)})
        if study.patient_id:
            patients.setdefault((study.patient_id, study.patient_id_issuer), None)
    for patient_id, issuer in patients:
        # PS3.15 A.5.2.5 / HL7 CX: ID^^^ISSUER when an issuer is known.
        shown = f"{patient_id}^^^{issuer}" if issuer else patient_id
        _object(message, shown, ID_PATIENT_NUMBER, type_code="1", role="1", name=patient_id)
    return message


def query(
    *,
    source_id: str,
    source: Participant,
    destination: Participant,
    sop_class: str,
    query_dataset: bytes,
    transfer_syntax: str = "",
    outcome: str = "success",
    description: str = "",
    when: dt.datetime | None = None,
) -> ET.Element:
    """Query (A.5.3.10): the C-FIND identifier, base64 (never parsed here)."""
    message = _message(EV_QUERY, "E", outcome, when, description)
    Participant(
        source.user_id, True, ROLE_SOURCE, source.ae_titles, source.user_name, source.network_access_point
    ).add_to(message)
    Participant(
        destination.user_id,
        False,
        ROLE_DESTINATION,
        destination.ae_titles,
        destination.user_name,
        destination.network_access_point,
    ).add_to(message)
    _source(message, source_id)
    details = {"TransferSyntax": transfer_syntax} if transfer_syntax else None
    _object(message, sop_class, ID_SOP_CLASS_UID, type_code="2", role="3", query=query_dataset, details=details)
    return message


def patient_record(
    *,
    source_id: str,
    app: Participant,
    patients: Iterable[tuple[str, str, str]],
    performer: Participant | None = None,
    outcome: str = "success",
    description: str = "",
    when: dt.datetime | None = None,
) -> ET.Element:
    """Patient Record (A.5.3.9): a patient's cross-reference changed (a merge, a link added or removed).

    `patients` are (patient id, issuer, lifecycle) with lifecycle "U" (updated, the survivor)
    or "D" (subsumed, the prior record of a merge); the action is U.
    """
    message = _message(EV_PATIENT_RECORD, "U", outcome, when, description)
    Participant(app.user_id, performer is None, ROLE_APPLICATION, app.ae_titles).add_to(message)
    if performer is not None:
        Participant(performer.user_id, True, None, (), performer.user_name, performer.network_access_point).add_to(
            message
        )
    _source(message, source_id)
    for patient_id, issuer, lifecycle in patients:
        shown = f"{patient_id}^^^{issuer}" if issuer else patient_id
        element = _object(message, shown, ID_PATIENT_NUMBER, type_code="1", role="1", name=patient_id)
        # PS3.15 A.5.2.5 ParticipantObjectDataLifeCycle: 3 amendment (the survivor), 14 logical deletion.
        element.set("ParticipantObjectDataLifeCycle", "14" if lifecycle == "D" else "3")
    return message


def user_authentication(
    *,
    source_id: str,
    user: Participant,
    node: Participant | None = None,
    login: bool = True,
    outcome: str = "success",
    description: str = "",
    when: dt.datetime | None = None,
) -> ET.Element:
    """User Authentication (A.5.3.11): a router account signing on (or off) at the bridge."""
    message = _message(EV_USER_AUTHENTICATION, "E", outcome, when, description, [ET_LOGIN if login else ET_LOGOUT])
    Participant(user.user_id, True, None, user.ae_titles, user.user_name, user.network_access_point).add_to(message)
    if node is not None:
        Participant(
            node.user_id, False, ROLE_APPLICATION, node.ae_titles, node.user_name, node.network_access_point
        ).add_to(message)
    _source(message, source_id)
    return message


def security_alert(
    *,
    source_id: str,
    reporter: Participant,
    alert: Code,
    subject: str = "",
    subject_type: Code = ID_NODE,
    performer: Participant | None = None,
    outcome: str = "alert",
    description: str = "",
    when: dt.datetime | None = None,
) -> ET.Element:
    """Security Alert (A.5.3.9): tampering, refused access, account or configuration changes."""
    message = _message(EV_SECURITY_ALERT, "E", outcome, when, description, [alert])
    Participant(
        reporter.user_id, False, ROLE_APPLICATION, reporter.ae_titles, reporter.user_name, reporter.network_access_point
    ).add_to(message)
    if performer is not None:
        Participant(
            performer.user_id, True, None, performer.ae_titles, performer.user_name, performer.network_access_point
        ).add_to(message)
    _source(message, source_id)
    if subject:
        # 2/13: a system object in the role of a security resource (the account, node or setting).
        _object(message, subject, subject_type, type_code="2", role="13")
    return message


XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'


def to_bytes(message: ET.Element) -> bytes:
    """The message as UTF-8 XML on one line, declaration included (what the syslog MSG carries).

    ElementTree's own declaration ends with a newline, which syslog collectors escape or
    treat as a record end; ours does not.
    """
    return XML_DECLARATION + ET.tostring(message, encoding="utf-8", xml_declaration=False)


# --------------------------------------------------------------------------- from JSON records

# Administrative and security events by name: (event type code, subject key in the record).
_ACCOUNT_EVENTS = {
    "router_add",
    "router_remove",
    "router_disable",
    "router_enable",
    "router_passwd",
    "router_reset_identity",
    "router_enroll_token",
}
_CONFIG_EVENTS = {"pin", "enroll", "peer_approve", "peer_reject"}


def from_record(record: Mapping[str, Any], *, source_id: str) -> list[ET.Element]:
    """The DICOM messages for one JSON audit record (none when PS3.15 has none for it).

    Plain association records (no studies seen) stay JSON-only: PS3.15 has no
    "association" event, and the message would name nothing an auditor asks about.
    """
    event = str(record.get("event", ""))
    outcome = str(record.get("outcome", "success"))
    detail = str(record.get("detail", "") or "")
    app = Participant(f"{record.get('app', 'relay')}@{source_id}")
    source_address = str(record.get("source", "") or "").rsplit(":", 1)[0] if record.get("source") else ""
    if event == "association" and (record.get("studies") or record.get("queries")):
        return _transfers(record, source_id, outcome, detail, app) + _queries(record, source_id, outcome, detail)
    if event in ("sign_on", "sign_off", "login"):
        user = Participant(
            str(record.get("router") or record.get("site") or "-"), True, network_access_point=source_address
        )
        return [
            user_authentication(
                source_id=source_id, user=user, node=app, login=event != "sign_off", outcome=outcome, description=detail
            )
        ]
    if event in ("identity_merge", "pix_add", "pix_remove") and record.get("patient_id"):
        # The router's patient cross-reference changed (relay_router.identity): prior and surviving records.
        issuer = str(record.get("issuer", "") or "")
        patients = [(str(record["patient_id"]), issuer, "U")]
        if record.get("prior_id"):
            patients.append((str(record["prior_id"]), issuer, "D"))
        if record.get("other_id"):
            patients.append((str(record["other_id"]), str(record.get("other_issuer", "") or ""), "U"))
        feed = Participant(str(record.get("source", "")), True) if record.get("source") else None
        performer = Participant(str(record["user"]), True) if record.get("user") else feed
        return [
            patient_record(
                source_id=source_id, app=app, patients=patients, performer=performer, outcome=outcome,
                description=detail or event,
            )
        ]  # fmt: skip
    if event in ("start", "stop"):
        return [
            application_activity(
                source_id=source_id, app=app, started=event == "start", outcome=outcome, description=detail
            )
        ]
    if event in ("router_list", "share_list"):
        performer = Participant(str(record.get("user", "") or "administrator"), True)
        return [
            security_alert(
                source_id=source_id,
                reporter=app,
                alert=ET_USE_OF_RESTRICTED_FUNCTION,
                performer=performer,
                outcome=outcome,
                description=detail or event,
            )
        ]
    if event in _ACCOUNT_EVENTS or event.startswith("router_"):
        performer = Participant(str(record.get("user", "") or "administrator"), True)
        return [
            security_alert(
                source_id=source_id,
                reporter=app,
                alert=ET_USER_SECURITY_ATTRIBUTES_CHANGED,
                subject=str(record.get("router", "")),
                performer=performer,
                outcome="success" if outcome == "success" else outcome,
                description=detail or event,
            )
        ]
    if event in _CONFIG_EVENTS or event.startswith(("share_", "pin_")):
        alert = ET_NODE_AUTHENTICATION if event == "enroll" else ET_SECURITY_CONFIGURATION
        return [
            security_alert(
                source_id=source_id,
                reporter=app,
                alert=alert,
                subject=str(record.get("router") or record.get("site") or ""),
                outcome=outcome,
                description=detail or event,
            )
        ]
    if outcome == "alert":
        alert = (
            ET_NODE_AUTHENTICATION
            if "identity" in event or event == "peer_unapproved"
            else ET_USE_OF_RESTRICTED_FUNCTION
        )
        subject = str(record.get("peer_site") or record.get("router") or record.get("site") or "")
        return [
            security_alert(source_id=source_id, reporter=app, alert=alert, subject=subject, description=detail or event)
        ]
    return []


def _transfers(
    record: Mapping[str, Any], source_id: str, outcome: str, detail: str, app: Participant
) -> list[ET.Element]:
    """One Instances Transferred message per sending side (relay_router.studytap records)."""
    calling_ae, called_ae = str(record.get("calling_ae", "")), str(record.get("called_ae", ""))
    calling = Participant(calling_ae or "-", True, ae_titles=(calling_ae,) if calling_ae else ())
    called = Participant(called_ae or "-", False, ae_titles=(called_ae,) if called_ae else ())
    messages = []
    for sender in ("calling", "called"):
        studies = [
            StudyRecord(
                str(s["study_uid"]),
                str(s.get("patient_id", "")),
                str(s.get("patient_id_issuer", "")),
                {str(k): int(v) for k, v in dict(s.get("sop_classes", {})).items()},
            )
            for s in record.get("studies") or []
            if s.get("sent_by", "calling") == sender
        ]
        if not studies:
            continue
        source, destination = (calling, called) if sender == "calling" else (called, calling)
        messages.append(
            instances_transferred(
                source_id=source_id,
                source=source,
                destination=destination,
                studies=studies,
                others=[Participant(app.user_id, False, ROLE_APPLICATION)],
                outcome=outcome,
                description=detail,
                site=str(record.get("site", "")),
            )
        )
    return messages


def _queries(record: Mapping[str, Any], source_id: str, outcome: str, detail: str) -> list[ET.Element]:
    """One Query message per C-FIND the association carried (relay_router.studytap records)."""
    calling_ae, called_ae = str(record.get("calling_ae", "")), str(record.get("called_ae", ""))
    calling = Participant(calling_ae or "-", True, ae_titles=(calling_ae,) if calling_ae else ())
    called = Participant(called_ae or "-", False, ae_titles=(called_ae,) if called_ae else ())
    messages = []
    for q in record.get("queries") or []:
        source, destination = (calling, called) if q.get("sent_by", "calling") == "calling" else (called, calling)
        messages.append(
            query(
                source_id=source_id,
                source=source,
                destination=destination,
                sop_class=str(q.get("sop_class", "")),
                query_dataset=base64.b64decode(str(q.get("identifier", ""))),
                transfer_syntax=str(q.get("transfer_syntax", "")),
                outcome=outcome,
                description=detail,
            )
        )
    return messages

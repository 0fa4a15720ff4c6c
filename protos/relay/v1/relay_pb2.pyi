from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlobSlotRequest(_message.Message):
    __slots__ = ("association_id", "blob_id", "part", "download", "size")
    ASSOCIATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    association_id: str
    blob_id: str
    part: int
    download: bool
    size: int
    def __init__(self, association_id: _Optional[str] = ..., blob_id: _Optional[str] = ..., part: _Optional[int] = ..., download: _Optional[bool] = ..., size: _Optional[int] = ...) -> None: ...

class BlobSlotResponse(_message.Message):
    __slots__ = ("blob_id", "url", "expires_unix")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    url: str
    expires_unix: int
    def __init__(self, blob_id: _Optional[str] = ..., url: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class BlobPart(_message.Message):
    __slots__ = ("url", "data")
    URL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    url: str
    data: bytes
    def __init__(self, url: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class BlobPartAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("account", "password", "enrollment_token", "identity", "csr_pem")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    account: str
    password: str
    enrollment_token: str
    identity: Identity
    csr_pem: bytes
    def __init__(self, account: _Optional[str] = ..., password: _Optional[str] = ..., enrollment_token: _Optional[str] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ...) -> None: ...

class RouterMessage(_message.Message):
    __slots__ = ("sign_on", "heartbeat", "publish")
    SIGN_ON_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    sign_on: SignOn
    heartbeat: Heartbeat
    publish: PublishDevices
    def __init__(self, sign_on: _Optional[_Union[SignOn, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., publish: _Optional[_Union[PublishDevices, _Mapping]] = ...) -> None: ...

class BridgeMessage(_message.Message):
    __slots__ = ("sign_on_result", "heartbeat", "directory", "incoming", "audit", "move")
    SIGN_ON_RESULT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    INCOMING_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    MOVE_FIELD_NUMBER: _ClassVar[int]
    sign_on_result: SignOnResult
    heartbeat: Heartbeat
    directory: Directory
    incoming: IncomingAssociation
    audit: AuditNotice
    move: Move
    def __init__(self, sign_on_result: _Optional[_Union[SignOnResult, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., directory: _Optional[_Union[Directory, _Mapping]] = ..., incoming: _Optional[_Union[IncomingAssociation, _Mapping]] = ..., audit: _Optional[_Union[AuditNotice, _Mapping]] = ..., move: _Optional[_Union[Move, _Mapping]] = ...) -> None: ...

class Move(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class AuditNotice(_message.Message):
    __slots__ = ("event", "peer_site", "ae_title", "detail")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    PEER_SITE_FIELD_NUMBER: _ClassVar[int]
    AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    event: str
    peer_site: str
    ae_title: str
    detail: str
    def __init__(self, event: _Optional[str] = ..., peer_site: _Optional[str] = ..., ae_title: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class SignOn(_message.Message):
    __slots__ = ("account", "password", "software_version", "protocols", "devices", "identity")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOLS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    account: str
    password: str
    software_version: str
    protocols: _containers.RepeatedScalarFieldContainer[str]
    devices: _containers.RepeatedCompositeFieldContainer[SharedDevice]
    identity: Identity
    def __init__(self, account: _Optional[str] = ..., password: _Optional[str] = ..., software_version: _Optional[str] = ..., protocols: _Optional[_Iterable[str]] = ..., devices: _Optional[_Iterable[_Union[SharedDevice, _Mapping]]] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...

class Identity(_message.Message):
    __slots__ = ("sign_key", "kem_key", "kem")
    SIGN_KEY_FIELD_NUMBER: _ClassVar[int]
    KEM_KEY_FIELD_NUMBER: _ClassVar[int]
    KEM_FIELD_NUMBER: _ClassVar[int]
    sign_key: bytes
    kem_key: bytes
    kem: str
    def __init__(self, sign_key: _Optional[bytes] = ..., kem_key: _Optional[bytes] = ..., kem: _Optional[str] = ...) -> None: ...

class SignOnResult(_message.Message):
    __slots__ = ("ok", "error", "session", "site", "heartbeat_interval_s")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SITE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    session: str
    site: str
    heartbeat_interval_s: int
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., session: _Optional[str] = ..., site: _Optional[str] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_unix_ms",)
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    sent_unix_ms: int
    def __init__(self, sent_unix_ms: _Optional[int] = ...) -> None: ...

class PublishDevices(_message.Message):
    __slots__ = ("devices",)
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[SharedDevice]
    def __init__(self, devices: _Optional[_Iterable[_Union[SharedDevice, _Mapping]]] = ...) -> None: ...

class SharedDevice(_message.Message):
    __slots__ = ("ae_title", "description", "share_with", "grants")
    AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    SHARE_WITH_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    ae_title: str
    description: str
    share_with: _containers.RepeatedScalarFieldContainer[str]
    grants: _containers.RepeatedCompositeFieldContainer[ServiceGrant]
    def __init__(self, ae_title: _Optional[str] = ..., description: _Optional[str] = ..., share_with: _Optional[_Iterable[str]] = ..., grants: _Optional[_Iterable[_Union[ServiceGrant, _Mapping]]] = ...) -> None: ...

class ServiceGrant(_message.Message):
    __slots__ = ("site", "services")
    SITE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    site: str
    services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, site: _Optional[str] = ..., services: _Optional[_Iterable[str]] = ...) -> None: ...

class Directory(_message.Message):
    __slots__ = ("devices", "identities")
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    IDENTITIES_FIELD_NUMBER: _ClassVar[int]
    devices: _containers.RepeatedCompositeFieldContainer[RemoteDevice]
    identities: _containers.RepeatedCompositeFieldContainer[SiteIdentity]
    def __init__(self, devices: _Optional[_Iterable[_Union[RemoteDevice, _Mapping]]] = ..., identities: _Optional[_Iterable[_Union[SiteIdentity, _Mapping]]] = ...) -> None: ...

class SiteIdentity(_message.Message):
    __slots__ = ("site", "identity")
    SITE_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    site: str
    identity: Identity
    def __init__(self, site: _Optional[str] = ..., identity: _Optional[_Union[Identity, _Mapping]] = ...) -> None: ...

class RemoteDevice(_message.Message):
    __slots__ = ("site", "ae_title", "description", "online", "services")
    SITE_FIELD_NUMBER: _ClassVar[int]
    AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    site: str
    ae_title: str
    description: str
    online: bool
    services: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, site: _Optional[str] = ..., ae_title: _Optional[str] = ..., description: _Optional[str] = ..., online: _Optional[bool] = ..., services: _Optional[_Iterable[str]] = ...) -> None: ...

class IncomingAssociation(_message.Message):
    __slots__ = ("association_id", "from_site", "called_ae_title", "first_frame", "handshake", "features", "caller_identity", "direct_join")
    ASSOCIATION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SITE_FIELD_NUMBER: _ClassVar[int]
    CALLED_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CALLER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    DIRECT_JOIN_FIELD_NUMBER: _ClassVar[int]
    association_id: str
    from_site: str
    called_ae_title: str
    first_frame: Frame
    handshake: Handshake
    features: _containers.RepeatedScalarFieldContainer[str]
    caller_identity: Identity
    direct_join: DirectJoin
    def __init__(self, association_id: _Optional[str] = ..., from_site: _Optional[str] = ..., called_ae_title: _Optional[str] = ..., first_frame: _Optional[_Union[Frame, _Mapping]] = ..., handshake: _Optional[_Union[Handshake, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., caller_identity: _Optional[_Union[Identity, _Mapping]] = ..., direct_join: _Optional[_Union[DirectJoin, _Mapping]] = ...) -> None: ...

class DirectJoin(_message.Message):
    __slots__ = ("replica", "ticket")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    replica: str
    ticket: str
    def __init__(self, replica: _Optional[str] = ..., ticket: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("open", "join", "accepted", "refused", "data", "close", "confirm")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CONFIRM_FIELD_NUMBER: _ClassVar[int]
    open: Open
    join: Join
    accepted: Accepted
    refused: Refused
    data: Data
    close: Close
    confirm: Confirm
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., join: _Optional[_Union[Join, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., refused: _Optional[_Union[Refused, _Mapping]] = ..., data: _Optional[_Union[Data, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., confirm: _Optional[_Union[Confirm, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("association_id", "to_site", "called_ae_title", "calling_ae_title", "first_data", "handshake", "features", "direct_join")
    ASSOCIATION_ID_FIELD_NUMBER: _ClassVar[int]
    TO_SITE_FIELD_NUMBER: _ClassVar[int]
    CALLED_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    CALLING_AE_TITLE_FIELD_NUMBER: _ClassVar[int]
    FIRST_DATA_FIELD_NUMBER: _ClassVar[int]
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DIRECT_JOIN_FIELD_NUMBER: _ClassVar[int]
    association_id: str
    to_site: str
    called_ae_title: str
    calling_ae_title: str
    first_data: Data
    handshake: Handshake
    features: _containers.RepeatedScalarFieldContainer[str]
    direct_join: DirectJoin
    def __init__(self, association_id: _Optional[str] = ..., to_site: _Optional[str] = ..., called_ae_title: _Optional[str] = ..., calling_ae_title: _Optional[str] = ..., first_data: _Optional[_Union[Data, _Mapping]] = ..., handshake: _Optional[_Union[Handshake, _Mapping]] = ..., features: _Optional[_Iterable[str]] = ..., direct_join: _Optional[_Union[DirectJoin, _Mapping]] = ...) -> None: ...

class Handshake(_message.Message):
    __slots__ = ("kem_ciphertext", "signature", "suite", "ephemeral_key", "sent_unix_ms")
    KEM_CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    SUITE_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_KEY_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    kem_ciphertext: bytes
    signature: bytes
    suite: str
    ephemeral_key: bytes
    sent_unix_ms: int
    def __init__(self, kem_ciphertext: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., suite: _Optional[str] = ..., ephemeral_key: _Optional[bytes] = ..., sent_unix_ms: _Optional[int] = ...) -> None: ...

class Confirm(_message.Message):
    __slots__ = ("signature", "features", "ephemeral_reply")
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_REPLY_FIELD_NUMBER: _ClassVar[int]
    signature: bytes
    features: _containers.RepeatedScalarFieldContainer[str]
    ephemeral_reply: bytes
    def __init__(self, signature: _Optional[bytes] = ..., features: _Optional[_Iterable[str]] = ..., ephemeral_reply: _Optional[bytes] = ...) -> None: ...

class Join(_message.Message):
    __slots__ = ("association_id",)
    ASSOCIATION_ID_FIELD_NUMBER: _ClassVar[int]
    association_id: str
    def __init__(self, association_id: _Optional[str] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("association_id",)
    ASSOCIATION_ID_FIELD_NUMBER: _ClassVar[int]
    association_id: str
    def __init__(self, association_id: _Optional[str] = ...) -> None: ...

class Refused(_message.Message):
    __slots__ = ("reason", "detail")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Refused.Reason]
        UNKNOWN_DEVICE: _ClassVar[Refused.Reason]
        NOT_PERMITTED: _ClassVar[Refused.Reason]
        SITE_OFFLINE: _ClassVar[Refused.Reason]
        DEVICE_UNREACHABLE: _ClassVar[Refused.Reason]
        TIMEOUT: _ClassVar[Refused.Reason]
        OVERLOADED: _ClassVar[Refused.Reason]
        SERVICE_NOT_GRANTED: _ClassVar[Refused.Reason]
        DRAINING: _ClassVar[Refused.Reason]
    REASON_UNSPECIFIED: Refused.Reason
    UNKNOWN_DEVICE: Refused.Reason
    NOT_PERMITTED: Refused.Reason
    SITE_OFFLINE: Refused.Reason
    DEVICE_UNREACHABLE: Refused.Reason
    TIMEOUT: Refused.Reason
    OVERLOADED: Refused.Reason
    SERVICE_NOT_GRANTED: Refused.Reason
    DRAINING: Refused.Reason
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reason: Refused.Reason
    detail: str
    def __init__(self, reason: _Optional[_Union[Refused.Reason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("payload", "seq", "flags", "blob")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    seq: int
    flags: int
    blob: BlobRef
    def __init__(self, payload: _Optional[bytes] = ..., seq: _Optional[int] = ..., flags: _Optional[int] = ..., blob: _Optional[_Union[BlobRef, _Mapping]] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("blob_id", "size", "digest")
    BLOB_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    blob_id: str
    size: int
    digest: bytes
    def __init__(self, blob_id: _Optional[str] = ..., size: _Optional[int] = ..., digest: _Optional[bytes] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ("reason", "detail", "code")
    class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        REASON_UNSPECIFIED: _ClassVar[Close.Reason]
        PEER_CLOSED: _ClassVar[Close.Reason]
        ABORTED: _ClassVar[Close.Reason]
        SHUTDOWN: _ClassVar[Close.Reason]
    REASON_UNSPECIFIED: Close.Reason
    PEER_CLOSED: Close.Reason
    ABORTED: Close.Reason
    SHUTDOWN: Close.Reason
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Close.Code]
        CODE_OTHER: _ClassVar[Close.Code]
        CODE_PROTOCOL: _ClassVar[Close.Code]
        CODE_LINK_LOST: _ClassVar[Close.Code]
        CODE_PEER_ABORTED: _ClassVar[Close.Code]
        CODE_IDLE: _ClassVar[Close.Code]
        CODE_SPILL: _ClassVar[Close.Code]
        CODE_SHUTDOWN: _ClassVar[Close.Code]
        CODE_SECURITY: _ClassVar[Close.Code]
        CODE_DEVICE_REJECTED: _ClassVar[Close.Code]
        CODE_DEVICE_UNREACHABLE: _ClassVar[Close.Code]
        CODE_TIMEOUT: _ClassVar[Close.Code]
        CODE_OVERLOADED: _ClassVar[Close.Code]
        CODE_SERVICE_NOT_GRANTED: _ClassVar[Close.Code]
        CODE_REQUEST_TOO_LARGE: _ClassVar[Close.Code]
    CODE_UNSPECIFIED: Close.Code
    CODE_OTHER: Close.Code
    CODE_PROTOCOL: Close.Code
    CODE_LINK_LOST: Close.Code
    CODE_PEER_ABORTED: Close.Code
    CODE_IDLE: Close.Code
    CODE_SPILL: Close.Code
    CODE_SHUTDOWN: Close.Code
    CODE_SECURITY: Close.Code
    CODE_DEVICE_REJECTED: Close.Code
    CODE_DEVICE_UNREACHABLE: Close.Code
    CODE_TIMEOUT: Close.Code
    CODE_OVERLOADED: Close.Code
    CODE_SERVICE_NOT_GRANTED: Close.Code
    CODE_REQUEST_TOO_LARGE: Close.Code
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    reason: Close.Reason
    detail: str
    code: Close.Code
    def __init__(self, reason: _Optional[_Union[Close.Reason, str]] = ..., detail: _Optional[str] = ..., code: _Optional[_Union[Close.Code, str]] = ...) -> None: ...

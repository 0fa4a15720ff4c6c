"""`relay-router enroll`: register this router's identity with the bridge, get a client certificate.

The identity keys and the TLS client key are generated here and never leave
the router; the bridge receives the public keys and a CSR, and checks the
account password and the one-time token that `relay-bridge router add` printed.
"""

from __future__ import annotations

import grpc

from protos.relay.v1 import relay_pb2 as pb
from protos.relay.v1 import relay_pb2_grpc as pb_grpc
from relay_common.files import write_private
from relay_common.pki import make_csr
from relay_router.config import RouterConfig
from relay_router.seal import KEM_NAME, Identity

CLIENT_CERT = "client.pem"
CLIENT_KEY = "client.key"


class EnrollError(Exception):
    pass


def enroll(config: RouterConfig, token: str, *, timeout_s: float = 30.0) -> tuple[Identity, bool]:
    """Enroll; returns this router's identity and whether a client certificate was issued."""
    bridge = config.bridge
    state = config.router.state_dir
    identity = Identity.load_or_create(state / "identity.key")
    key_pem, csr_pem = make_csr(config.router.name)
    address = bridge.enroll_address or bridge.address
    options: list[tuple[str, str]] = []
    if bridge.server_name:
        options.append(("grpc.ssl_target_name_override", bridge.server_name))
    if bridge.insecure:
        channel = grpc.insecure_channel(address)
    else:
        assert bridge.ca_file is not None
        credentials = grpc.ssl_channel_credentials(root_certificates=bridge.ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials, options=options)
    request = pb.EnrollRequest(
        account=config.router.name,
        password=bridge.resolve_password(),
        enrollment_token=token,
        identity=pb.Identity(sign_key=identity.public.sign_key, kem_key=identity.public.kem_key, kem=KEM_NAME),
        csr_pem=csr_pem,
    )
    try:
        with channel:
            answer = pb_grpc.RelayStub(channel).Enroll(request, timeout=timeout_s)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise EnrollError(f"cannot reach the bridge at {address} to enroll: {details}") from exc
        raise EnrollError(f"the bridge at {address} refused enrollment: {details}") from exc
    if answer.certificate_pem:
        write_private(state / CLIENT_KEY, key_pem)
        (state / CLIENT_CERT).write_bytes(answer.certificate_pem)
    return identity, bool(answer.certificate_pem)

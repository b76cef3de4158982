"""The auth service: accounts, login, JWT access and refresh tokens, JWKS, MFA, sessions, parent links and the
audit trail.

The contract is complete; the features arrive with issue 3. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.auth.v1 import auth_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            auth_service_pb2_grpc.add_AuthServiceServicer_to_server,
            auth_service_pb2_grpc.AuthServiceServicer(),
        )
    ]

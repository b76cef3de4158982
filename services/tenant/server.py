"""The tenant service: zones (which zone a host belongs to) and organisations.

The contract is complete; the features arrive with issue 3. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.tenant.v1 import tenant_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            tenant_service_pb2_grpc.add_TenantServiceServicer_to_server,
            tenant_service_pb2_grpc.TenantServiceServicer(),
        )
    ]

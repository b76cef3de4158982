"""The kzone service: k-Zone live voice and dance analysis and reference content.

The contract is complete; the features arrive with issue 6. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.kzone.v1 import kzone_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            kzone_service_pb2_grpc.add_KZoneServiceServicer_to_server,
            kzone_service_pb2_grpc.KZoneServiceServicer(),
        )
    ]

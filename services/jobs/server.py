"""The jobs service: long-running AI jobs over Redis Streams and per-org AI credits.

The contract is complete; the features arrive with their own issue. Until then the generated servicer
answers every RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.jobs.v1 import jobs_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            jobs_service_pb2_grpc.add_JobsServiceServicer_to_server,
            jobs_service_pb2_grpc.JobsServiceServicer(),
        )
    ]

"""The tutor service: tutoring sessions, assignments, AI feedback and the streaming AI tutor chat.

The contract is complete; the features arrive with their own issue. Until then the generated servicer
answers every RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.tutor.v1 import tutor_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            tutor_service_pb2_grpc.add_TutorServiceServicer_to_server,
            tutor_service_pb2_grpc.TutorServiceServicer(),
        )
    ]

"""The exam service: item bank, computerized adaptive testing, attempts, scoring, reports and calibration.

The contract is complete; the features arrive with issue 4. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.exam.v1 import exam_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            exam_service_pb2_grpc.add_ExamServiceServicer_to_server,
            exam_service_pb2_grpc.ExamServiceServicer(),
        )
    ]

"""The pose service: pose landmark inference server (mediapipe PoseLandmarker), internal only.

The contract is complete; the features arrive with issue 6. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.pose.v1 import pose_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            pose_service_pb2_grpc.add_PoseServiceServicer_to_server,
            pose_service_pb2_grpc.PoseServiceServicer(),
        )
    ]

"""The asr service: speech recognition inference server (faster-whisper), internal only.

The contract is complete; the features arrive with issue 6. Until then the generated servicer answers every
RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.asr.v1 import asr_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            asr_service_pb2_grpc.add_AsrServiceServicer_to_server, asr_service_pb2_grpc.AsrServiceServicer()
        )
    ]

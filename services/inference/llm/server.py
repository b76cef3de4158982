"""The llm service: language model inference server (vLLM engine), internal only.

The contract is complete; the features arrive with their own issue. Until then the generated servicer
answers every RPC with UNIMPLEMENTED (the runtime maps it, with reason NOT_IMPLEMENTED).
"""

from megacity.llm.v1 import llm_service_pb2_grpc
from services.runtime.server import Dependencies, ServicerBinding


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [
        ServicerBinding(
            llm_service_pb2_grpc.add_LlmServiceServicer_to_server, llm_service_pb2_grpc.LlmServiceServicer()
        )
    ]

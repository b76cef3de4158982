"""Types of the servicer context a handler receives, to annotate servicers the way the generated stubs expect.

async def GetExam(self, request: GetExamRequest, context: UnaryContext[GetExamRequest, GetExamResponse])
async def WatchJob(self, request: WatchJobRequest, context: StreamingContext[WatchJobRequest, JobUpdate])
bidi:   context: StreamingContext[AsyncIterator[Request], Response]
client-streaming: context: UnaryContext[AsyncIterator[Request], Response]
"""

from collections.abc import AsyncIterator, Awaitable
from typing import TypeAlias, TypeVar

import grpc

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

UnaryContext: TypeAlias = grpc.aio.ServicerContext[_Request, Awaitable[_Response]]
StreamingContext: TypeAlias = grpc.aio.ServicerContext[_Request, AsyncIterator[_Response]]

"""The exam service: item bank, computerized adaptive testing, attempts, scoring, reports and calibration.

The contract is complete; the features arrive with issue 4 and answer UNIMPLEMENTED (reason NOT_IMPLEMENTED)
until then. What is built already is the access rule of students' reports (issue 3): ListStudentReports decides
who may read them (services/exam/access.py) before anything is read.
"""

from __future__ import annotations

import grpc

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc
from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from services.exam.access import may_read_student_results
from services.runtime.callcontext import current_principal
from services.runtime.channels import ChannelFactory
from services.runtime.context import UnaryContext
from services.runtime.errors import ErrorReason, InvalidArgument, NotFound, PermissionDenied
from services.runtime.server import Dependencies, ServicerBinding


class ExamServicer(exam_service_pb2_grpc.ExamServiceServicer):
    def __init__(self, channels: ChannelFactory) -> None:
        self._channels = channels

    async def _check_may_read_student(self, student_id: str) -> None:
        """Refuses a person who may not read this student's results; services (no person) are the catalog's."""
        reader = current_principal()
        if reader is None:
            return
        auth = auth_service_pb2_grpc.AuthServiceStub(self._channels.channel("auth"))
        try:
            student = (await auth.LookupUser(auth_service_pb2.LookupUserRequest(user_id=student_id))).user
        except grpc.aio.AioRpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND:
                raise NotFound("no such student") from None
            raise
        approved = False
        if reader.role == "parent":
            check = auth_service_pb2.CheckParentLinkRequest(parent_id=reader.user_id, student_id=student_id)
            approved = (await auth.CheckParentLink(check)).approved
        if not may_read_student_results(reader, student.zone_id, student.org_id, student.id, approved_parent=approved):
            raise PermissionDenied(
                "you may not read this student's results", reason=ErrorReason.ERROR_REASON_OUT_OF_SCOPE
            )

    async def ListStudentReports(
        self,
        request: pb.ListStudentReportsRequest,
        context: UnaryContext[pb.ListStudentReportsRequest, pb.ListStudentReportsResponse],
    ) -> pb.ListStudentReportsResponse:
        if not request.student_id:
            raise InvalidArgument("student_id is required", [("student_id", "required")])
        await self._check_may_read_student(request.student_id)
        raise NotImplementedError("reports arrive with scoring (the exam issue)")


def servicers(deps: Dependencies) -> list[ServicerBinding]:
    return [ServicerBinding(exam_service_pb2_grpc.add_ExamServiceServicer_to_server, ExamServicer(deps.channels))]

"""An exam service over mTLS for tests through the wire, and a published adaptive exam over a 60-item bank."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from ops.embedded import EmbeddedRedis
from tests.support.accounts import Caller, People
from tests.support.mesh import channel_as, make_config, mesh_catalog, running

# Every item's right answer is A.
ITEMS = "\n".join(
    [
        "external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status",
        *(
            f"q{n},{('algebra', 'geometry', 'reading')[n % 3]},single_choice,Question {n},A=right|B=wrong,A,3PL,"
            f"{1.0 + (n % 5) / 5},{(n % 13) / 2 - 3},0.15,active"
            for n in range(60)
        ),
    ]
)


@asynccontextmanager
async def exam_service(
    people: People, identity_database: dict[str, str], redis: EmbeddedRedis
) -> AsyncIterator[exam_service_pb2_grpc.ExamServiceStub]:
    config = make_config(
        mesh_catalog(), "exam", people.pki_dir, database_url=identity_database["exam"], redis_url=redis.url
    )
    async with running(config) as service, channel_as("edge", service, people.pki_dir) as channel:
        yield exam_service_pb2_grpc.ExamServiceStub(channel)


async def published_exam(people: People, exam: exam_service_pb2_grpc.ExamServiceStub) -> tuple[str, str, Caller]:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    teacher = await people.as_new_user("univ", org.id, "teacher")
    await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=ITEMS), metadata=teacher.metadata()
    )
    config = res.AdaptiveConfig(min_items=5, max_items=8, standard_error_target=0.2)
    created = await exam.CreateExam(
        pb.CreateExamRequest(
            exam=res.Exam(title="Mock", adaptive=config, show_estimates=True, show_item_feedback=True)
        ),
        metadata=teacher.metadata(),
    )
    await exam.PublishExam(pb.PublishExamRequest(exam_id=created.exam.id), metadata=teacher.metadata())
    return org.id, created.exam.id, teacher

"""The item bank and exams through the wire: teachers author, import and publish; learners see what is theirs."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from megacity.exam.v1 import exam_service_pb2 as pb
from megacity.exam.v1 import exam_service_pb2_grpc
from megacity.exam.v1 import resources_pb2 as res
from megacity.tenant.v1 import resources_pb2 as tenant_resources
from megacity.tenant.v1 import tenant_service_pb2 as tenant_pb
from services.runtime.errors import field_violations, status_from_error
from tests.support.accounts import Caller, People, reason

CSV = "\n".join(
    [
        "external_id,content_area,item_type,stem,choices,answer,model,a,b,c,status",
        *(
            f"q{n},{area},single_choice,Question {n},A=yes|B=no,A,3PL,1.{n % 9},{(n % 7) - 3}.0,0.2,active"
            for n, area in ((n, ("algebra", "geometry", "reading")[n % 3]) for n in range(1, 31))
        ),
    ]
)


async def _fails(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call  # type: ignore[misc]
    return failure.value


async def _academy(people: People) -> tuple[str, Caller]:
    zone_admin = await people.as_new_user("univ", "univ-public", "zone_admin")
    org = (
        await people.tenant.CreateOrganization(
            tenant_pb.CreateOrganizationRequest(organization=tenant_resources.Organization(name="Academy")),
            metadata=zone_admin.metadata(),
        )
    ).organization
    return org.id, await people.as_new_user("univ", org.id, "teacher")


async def test_a_teacher_authors_items_and_a_bad_item_names_its_fields(
    people: People, exam: exam_service_pb2_grpc.ExamServiceStub
) -> None:
    org_id, teacher = await _academy(people)
    item = res.Item(
        content_area="algebra",
        item_type=res.ITEM_TYPE_SINGLE_CHOICE,
        stem="2 + 2 = ?",
        choices=[res.Choice(id="A", text="3"), res.Choice(id="B", text="4")],
        answer_key=res.AnswerKey(correct_choice_ids=["B"]),
        parameters=res.ItemParameters(model=res.IRT_MODEL_2PL, a=1.3, b=-1.0, c=0.4),
    )
    created = (await exam.CreateItem(pb.CreateItemRequest(item=item), metadata=teacher.metadata())).item
    assert (created.org_id, created.parameters.c, created.parameters.version) == (org_id, 0.0, 1)  # 2PL: c = 0
    fetched = (await exam.GetItem(pb.GetItemRequest(item_id=created.id), metadata=teacher.metadata())).item
    assert list(fetched.answer_key.correct_choice_ids) == ["B"]
    updated = await exam.UpdateItem(
        pb.UpdateItemRequest(
            item_id=created.id,
            item=res.Item(stem="2 + 3 = ?"),
            update_mask=field_mask_pb2.FieldMask(paths=["stem"]),
        ),
        metadata=teacher.metadata(),
    )
    assert (updated.item.stem, len(updated.item.choices)) == ("2 + 3 = ?", 2)
    bad = res.Item(content_area="", item_type=res.ITEM_TYPE_SINGLE_CHOICE, stem="?", parameters=res.ItemParameters())
    error = await _fails(exam.CreateItem(pb.CreateItemRequest(item=bad), metadata=teacher.metadata()))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    fields = {field for field, _ in field_violations(status_from_error(error))}
    assert {"item.content_area", "item.choices", "item.parameters.model"} <= fields
    student = await people.as_new_user("univ", org_id, "student")
    denied = await _fails(exam.CreateItem(pb.CreateItemRequest(item=item), metadata=student.metadata()))
    assert reason(denied) == "PERMISSION_MISSING"
    other_teacher = await people.as_new_user("univ", "univ-public", "teacher")
    hidden = await _fails(exam.GetItem(pb.GetItemRequest(item_id=created.id), metadata=other_teacher.metadata()))
    assert hidden.code() is grpc.StatusCode.NOT_FOUND


async def test_an_import_is_validated_row_by_row_and_is_all_or_nothing(
    people: People, exam: exam_service_pb2_grpc.ExamServiceStub
) -> None:
    _, teacher = await _academy(people)
    broken = CSV + "\nq99,algebra,single_choice,Broken,A=1|B=2,C,3PL,1,zero,0,active"
    checked = await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=broken), metadata=teacher.metadata()
    )
    assert [(e.row, e.field) for e in checked.errors] == [(31, "b")]
    assert checked.created_count == 0
    listed = await exam.ListItems(pb.ListItemsRequest(), metadata=teacher.metadata())
    assert listed.total_size == 0  # nothing stored while any row is wrong
    imported = await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=CSV), metadata=teacher.metadata()
    )
    assert (imported.created_count, imported.updated_count, list(imported.errors)) == (30, 0, [])
    again = await _fails(
        exam.ImportItems(pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=CSV), metadata=teacher.metadata())
    )
    assert again.code() is grpc.StatusCode.ALREADY_EXISTS
    upserted = await exam.ImportItems(
        pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=CSV, upsert=True), metadata=teacher.metadata()
    )
    assert (upserted.created_count, upserted.updated_count) == (0, 30)
    algebra = await exam.ListItems(
        pb.ListItemsRequest(content_area="algebra", min_b=0, page_size=4), metadata=teacher.metadata()
    )
    assert all(i.content_area == "algebra" and i.parameters.b >= 0 for i in algebra.items)
    assert len(algebra.items) == 4
    rest = await exam.ListItems(
        pb.ListItemsRequest(content_area="algebra", min_b=0, page_size=4, page_token=algebra.next_page_token),
        metadata=teacher.metadata(),
    )
    assert not {i.id for i in rest.items} & {i.id for i in algebra.items}
    assert len(algebra.items) + len(rest.items) == algebra.total_size


async def test_exams_are_authored_published_and_seen_by_the_right_learners(
    people: People, exam: exam_service_pb2_grpc.ExamServiceStub
) -> None:
    org_id, teacher = await _academy(people)
    await exam.ImportItems(pb.ImportItemsRequest(format=pb.IMPORT_FORMAT_CSV, content=CSV), metadata=teacher.metadata())
    adaptive = res.AdaptiveConfig(
        min_items=5, max_items=20, standard_error_target=0.3, content_blueprint={"algebra": 0.5, "geometry": 0.5}
    )
    draft = (
        await exam.CreateExam(
            pb.CreateExamRequest(exam=res.Exam(title="Mock 1", adaptive=adaptive)), metadata=teacher.metadata()
        )
    ).exam
    assert (draft.status, draft.pool_size) == (res.EXAM_STATUS_DRAFT, 30)
    invalid = await _fails(
        exam.CreateExam(
            pb.CreateExamRequest(
                exam=res.Exam(
                    title="", adaptive=res.AdaptiveConfig(min_items=9, max_items=3, content_blueprint={"x": 0.5})
                )
            ),
            metadata=teacher.metadata(),
        )
    )
    fields = {field for field, _ in field_violations(status_from_error(invalid))}
    assert {"exam.title", "exam.adaptive.min_items", "exam.adaptive.content_blueprint"} <= fields
    public = (
        await exam.CreateExam(
            pb.CreateExamRequest(exam=res.Exam(title="Open practice", is_public=True, adaptive=adaptive)),
            metadata=teacher.metadata(),
        )
    ).exam
    student = await people.as_new_user("univ", org_id, "student")
    guest = await people.as_new_user("univ", "univ-public", "guest")
    assert not (await exam.ListExams(pb.ListExamsRequest(), metadata=student.metadata())).exams  # drafts are hidden
    for exam_id in (draft.id, public.id):
        published = await exam.PublishExam(pb.PublishExamRequest(exam_id=exam_id), metadata=teacher.metadata())
        assert published.exam.status == res.EXAM_STATUS_PUBLISHED
    seen_by_student = {e.id for e in (await exam.ListExams(pb.ListExamsRequest(), metadata=student.metadata())).exams}
    seen_by_guest = {e.id for e in (await exam.ListExams(pb.ListExamsRequest(), metadata=guest.metadata())).exams}
    assert (seen_by_student, seen_by_guest) == ({draft.id, public.id}, {public.id})
    hidden = await _fails(exam.GetExam(pb.GetExamRequest(exam_id=draft.id), metadata=guest.metadata()))
    assert hidden.code() is grpc.StatusCode.NOT_FOUND
    frozen = await _fails(
        exam.UpdateExam(
            pb.UpdateExamRequest(exam_id=draft.id, exam=res.Exam(title="Renamed")), metadata=teacher.metadata()
        )
    )
    assert (frozen.code(), reason(frozen)) == (grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE_TRANSITION")
    archived = await exam.ArchiveExam(pb.ArchiveExamRequest(exam_id=draft.id), metadata=teacher.metadata())
    assert archived.exam.status == res.EXAM_STATUS_ARCHIVED
    not_deleted = await _fails(exam.DeleteExam(pb.DeleteExamRequest(exam_id=draft.id), metadata=teacher.metadata()))
    assert not_deleted.code() is grpc.StatusCode.FAILED_PRECONDITION

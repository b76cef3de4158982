"""Each public RPC declares its permission in the contract, and the role table grants exactly what it publishes.

The matrix test checks `grants` against an oracle written out by hand below (the role table expanded over the
permissions the contracts declare), not against anything derived from services/runtime/permissions.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from megacity.auth.v1.resources_pb2 import Role
from services.runtime.catalog import REPO
from services.runtime.contracts import MethodAccess, MethodInfo, default_pool, descriptor_set_path, service_methods
from services.runtime.permissions import ROLE_PERMISSIONS, grants, role_name, role_value


def _contract_methods() -> tuple[MethodInfo, ...]:
    """Every method of every service in the compiled contracts, read through the runtime's pool."""
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_path().read_bytes())
    services = [f"{file.package}.{service.name}" for file in files.file for service in file.service]
    return tuple(method for service in services for method in service_methods(default_pool(), service) or ())


METHODS = _contract_methods()
PUBLIC = tuple(method for method in METHODS if method.public)

# Every permission the contracts declare. A new one must be added here and to the oracle below.
DECLARED = frozenset(
    {
        "zone:create",
        "zone:update",
        "zone:suspend_organization",
        "zone:adjust_credits",
        "org:read",
        "org:create",
        "user:read",
        "user:create",
        "user:update",
        "item:create",
        "item:read",
        "item:update",
        "exam:create",
        "exam:read",
        "exam:update",
        "attempt:create",
        "attempt:read",
        "report:read",
        "audit:read",
        "profile:update",
    }
)

# The role table expanded by hand over DECLARED: which of them each role holds (super_admin: all of them).
ORACLE: dict[str, frozenset[str]] = {
    "super_admin": DECLARED,
    "zone_admin": frozenset(
        {
            "zone:create",
            "zone:update",
            "zone:suspend_organization",
            "zone:adjust_credits",
            "org:read",
            "org:create",
            "user:read",
            "user:create",
            "user:update",
            "exam:create",
            "exam:read",
            "exam:update",
            "report:read",
            "audit:read",
        }
    ),
    "org_admin": frozenset(
        {
            "org:read",
            "org:update",
            "user:read",
            "user:create",
            "user:update",
            "exam:create",
            "exam:read",
            "exam:update",
            "report:read",
        }
    ),
    "teacher": frozenset(
        {
            "exam:create",
            "exam:read",
            "exam:update",
            "item:create",
            "item:read",
            "item:update",
            "attempt:read",
            "report:read",
        }
    ),
    "student": frozenset({"exam:read", "attempt:create", "attempt:read", "profile:update"}),
    "parent": frozenset({"attempt:read", "report:read"}),
    "guest": frozenset({"exam:read"}),
}


def _access(method: MethodInfo) -> MethodAccess:
    assert method.access is not None, f"{method.path} declares no access"
    return method.access


def test_every_rest_rpc_declares_access_and_beyond_them_only_live_streams_do() -> None:
    assert len(PUBLIC) > 50  # the published surface, not an empty contract set
    for method in METHODS:
        if method.rest:
            assert method.access is not None, f"{method.path} has an HTTP rule but declares no access"
        elif method.access is not None:
            # gRPC-only through the edge: the live streams a microphone or camera feeds, nothing else.
            assert method.client_streaming, f"{method.path} is public without REST"
            assert method.server_streaming, f"{method.path} is public without REST"
    live = {method.path for method in PUBLIC if not method.rest}
    assert live == {"/megacity.kzone.v1.KZoneService/AnalyzeVoice", "/megacity.kzone.v1.KZoneService/AnalyzeDance"}


def test_declared_access_is_well_formed_and_listed() -> None:
    for method in PUBLIC:
        access = _access(method)
        if access.anonymous:
            assert access.permission == "", f"{method.path} is anonymous yet needs {access.permission}"
        elif access.permission:
            assert grants({"*"}, access.permission), f"{method.path}: malformed {access.permission!r}"
    assert {_access(method).permission for method in PUBLIC} - {""} == DECLARED


def test_access_is_read_from_the_descriptor_set() -> None:
    assert default_pool() is not descriptor_pool.Default()
    by_path = {method.path: method.access for method in PUBLIC}
    assert by_path["/megacity.auth.v1.AuthService/Login"] == MethodAccess(permission="", anonymous=True)
    assert by_path["/megacity.auth.v1.AuthService/GetMe"] == MethodAccess(permission="", anonymous=False)
    assert by_path["/megacity.exam.v1.ExamService/CreateExam"] == MethodAccess(
        permission="exam:create", anonymous=False
    )


def test_access_is_read_even_when_options_were_parsed_before_the_extension_was_known() -> None:
    # In a fresh interpreter: parse every method's options before megacity.common.v1.access is imported, as
    # anything touching the pool first would, then read the contracts through the runtime.
    script = textwrap.dedent(
        """
        from google.protobuf import descriptor_pb2, descriptor_pool

        files = descriptor_pb2.FileDescriptorSet.FromString(open("gen/descriptor/megacity.binpb", "rb").read())
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        login = pool.FindMethodByName("megacity.auth.v1.AuthService.Login").GetOptions()

        from megacity.common.v1 import access_pb2
        from services.runtime.contracts import service_methods

        assert not login.HasExtension(access_pb2.access), "the stale options already know the extension"
        methods = {method.name: method for method in service_methods(pool, "megacity.auth.v1.AuthService") or ()}
        assert methods["Login"].access is not None and methods["Login"].access.anonymous
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("role", "method"),
    [(role, method) for role in ORACLE for method in PUBLIC],
    ids=[f"{role}-{method.service}/{method.name}" for role in ORACLE for method in PUBLIC],
)
def test_permission_matrix(role: str, method: MethodInfo) -> None:
    needed = _access(method).permission
    expected = needed == "" or needed in ORACLE[role]
    assert grants(ROLE_PERMISSIONS[role], needed) == expected


def test_the_role_table_is_the_published_one() -> None:
    published = {
        "super_admin": {"*"},
        "zone_admin": {"zone:*", "org:read", "org:create", "user:*", "exam:*", "report:*", "audit:read"},
        "org_admin": {
            "org:read",
            "org:update",
            "user:read",
            "user:create",
            "user:update",
            "exam:*",
            "class:*",
            "report:read",
        },
        "teacher": {
            "exam:create",
            "exam:read",
            "exam:update",
            "item:create",
            "item:read",
            "item:update",
            "student:read",
            "attempt:read",
            "report:read",
        },
        "student": {"exam:read", "attempt:create", "attempt:read", "profile:read", "profile:update"},
        "parent": {"student:read", "attempt:read", "report:read"},
        "guest": {"exam:read"},
    }
    assert dict(ROLE_PERMISSIONS) == published


@pytest.mark.parametrize(
    ("held", "needed", "granted"),
    [
        ({"exam:read"}, "exam:read", True),
        ({"exam:read"}, "exam:update", False),
        ({"exam:read"}, "item:read", False),
        ({"exam:*"}, "exam:delete", True),
        ({"exam:*"}, "item:read", False),
        ({"exam:*"}, "examination:read", False),
        ({"*"}, "audit:read", True),
        ({"*"}, "anything_new:do_it", True),
        (set(), "exam:read", False),
        (set(), "", True),
        ({"exam:read"}, "", True),
        (["exam:read", "item:*"], "item:update", True),
    ],
)
def test_wildcards(held: Iterable[str], needed: str, granted: bool) -> None:
    assert grants(held, needed) is granted


@pytest.mark.parametrize(
    "held",
    ["*:read", "exam:re*", "ex*", "**", "exam:*:read", "exam:read ", " exam:read", "EXAM:READ", "exam", "exam:", ""],
)
def test_malformed_held_permissions_never_grant(held: str) -> None:
    assert not grants({held}, "exam:read")


@pytest.mark.parametrize(
    "needed",
    ["*", "exam:*", "*:read", "exam", "exam:", ":read", "exam:read:x", "exam:read ", "Exam:Read", "exam :read"],
)
def test_malformed_needed_permissions_are_granted_to_no_one(needed: str) -> None:
    assert not grants({"*", "exam:*", needed}, needed)


def test_a_lone_string_is_refused_rather_than_read_letter_by_letter() -> None:
    with pytest.raises(TypeError):
        grants("*", "exam:read")


def test_super_admin_holds_every_declared_permission() -> None:
    assert all(grants(ROLE_PERMISSIONS["super_admin"], needed) for needed in DECLARED)


def test_guest_holds_only_exam_read() -> None:
    assert {needed for needed in DECLARED if grants(ROLE_PERMISSIONS["guest"], needed)} == {"exam:read"}


def test_role_names_match_the_contract_enum() -> None:
    roles = [value for value in Role.values() if value != Role.ROLE_UNSPECIFIED]
    assert [role_name(value) for value in roles] == list(ROLE_PERMISSIONS)
    assert role_name(Role.ROLE_ZONE_ADMIN) == "zone_admin"
    assert all(role_value(role_name(value)) == value for value in roles)
    with pytest.raises(ValueError, match="ROLE_UNSPECIFIED"):
        role_name(Role.ROLE_UNSPECIFIED)
    with pytest.raises(ValueError, match="unknown role"):
        role_value("unspecified")

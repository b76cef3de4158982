"""Schemathesis against the edge's own OpenAPI document, with a valid token: generated requests (valid and invalid)
for every operation of the built services, through a real Envoy to the services over mTLS; no answer may be a
server error or break the document's schemas."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from services.runtime.server import Service
from tests.support.accounts import People
from tests.support.edge import running_edge

# Answer UNIMPLEMENTED (501) until their issues land; the rest of the document is held to it.
NOT_BUILT_YET = ("megacity.tutor.v1.TutorService", "megacity.kzone.v1.KZoneService", "megacity.jobs.v1.JobsService")
SESSION_ENDERS = ("AuthService_Logout", "AuthService_RevokeSession")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"


async def test_generated_requests_never_get_a_server_error_or_an_answer_outside_the_schema(
    people: People, people_services: dict[str, Service], tmp_path: Path
) -> None:
    admin = await people.as_new_user("univ", "univ-public", "super_admin")
    ports = {name: service.port for name, service in people_services.items()}
    async with running_edge(people.pki_dir, ports, None, tmp_path) as edge:
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"http://127.0.0.1:{edge.port}/openapi.json",
            "--checks",
            CHECKS,
            "--header",
            f"Authorization: Bearer {admin.token}",
            *(option for tag in NOT_BUILT_YET for option in ("--exclude-tag", tag)),
            # They would end the session whose token every other request carries (schemathesis reuses ids from
            # earlier answers, such as ListSessions').
            *(option for name in SESSION_ENDERS for option in ("--exclude-operation-id", name)),
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "10",
            "--seed",
            "20261122",
            "--request-timeout",
            "15",
            "--no-color",
            "--generation-database",
            "none",
        ]
        result = await asyncio.to_thread(
            subprocess.run, command, capture_output=True, text=True, timeout=900, cwd=tmp_path
        )
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-2000:]

"""The generated stubs are typed: a client written against them passes mypy --strict, a wrong field does not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.runtime.catalog import REPO

CLIENT = """
import grpc

from megacity.auth.v1 import auth_service_pb2, auth_service_pb2_grpc


async def login(channel: grpc.aio.Channel) -> str:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    reply = await stub.Login(auth_service_pb2.LoginRequest({arguments}))
    return reply.{field}
"""


def _mypy(tmp_path: Path, arguments: str, field: str) -> subprocess.CompletedProcess[str]:
    client = tmp_path / "client.py"
    client.write_text(CLIENT.format(arguments=arguments, field=field))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), str(client)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_correct_client_passes_mypy_strict(tmp_path: Path) -> None:
    checked = _mypy(tmp_path, 'email="ada@example.com", password="S3cure!pw"', "access_token")
    assert checked.returncode == 0, checked.stdout


@pytest.mark.parametrize(
    ("arguments", "field", "complaint"),
    [
        ('emial="ada@example.com"', "access_token", '"emial"'),
        ('email="ada@example.com"', "acess_token", '"acess_token"'),
        ("email=42", "access_token", 'Argument "email" to "LoginRequest" has incompatible type "int"'),
    ],
)
def test_a_wrong_field_is_a_type_error(tmp_path: Path, arguments: str, field: str, complaint: str) -> None:
    checked = _mypy(tmp_path, arguments, field)
    assert checked.returncode == 1
    assert complaint in checked.stdout

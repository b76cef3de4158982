"""The largest message a service takes is its catalog entry's `max_message_mib` (64 MiB unless it says more, as
kzone does for whole dance videos); past it, gRPC refuses the call with RESOURCE_EXHAUSTED."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import pytest
import yaml

from megacity.testing.v1 import probe_pb2, probe_pb2_grpc
from services.runtime.catalog import (
    DEFAULT_CATALOG,
    DEFAULT_MAX_MESSAGE_MIB,
    CatalogError,
    load_catalog,
    parse_catalog,
)
from tests.support.mesh import channel_as, mesh_catalog, running_probe

MIB = 1024 * 1024


async def test_a_service_takes_messages_up_to_its_own_limit(pki_dir: Path) -> None:
    catalog = mesh_catalog()
    small = catalog.with_service(dataclasses.replace(catalog.service("probe"), max_message_mib=2))
    async with running_probe(pki_dir, small) as probe, channel_as("ops", probe, pki_dir) as channel:
        stub = probe_pb2_grpc.ProbeServiceStub(channel)
        fits = await stub.Echo(probe_pb2.EchoRequest(payload="x" * (3 * MIB // 2)), timeout=10)
        assert len(fits.payload) == 3 * MIB // 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Echo(probe_pb2.EchoRequest(payload="x" * (3 * MIB)), timeout=10)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_kzone_takes_whole_dance_videos_and_the_others_the_default() -> None:
    catalog = load_catalog()
    assert catalog.service("kzone").max_message_mib * MIB > 500 * 1000 * 1000  # the edge's dance upload limit
    assert catalog.service("auth").max_message_mib == DEFAULT_MAX_MESSAGE_MIB


@pytest.mark.parametrize("value", [0, 4096, "big"])
def test_an_unusable_message_limit_is_refused(value: object) -> None:
    raw = yaml.safe_load(DEFAULT_CATALOG.read_text())
    raw["services"]["kzone"]["max_message_mib"] = value
    with pytest.raises(CatalogError, match="max_message_mib"):
        parse_catalog(raw)

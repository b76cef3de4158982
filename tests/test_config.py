"""Configuration from the environment: defaults, overrides, and clear errors for unusable values."""

from __future__ import annotations

import pytest

from services.runtime.catalog import load_catalog
from services.runtime.config import ConfigError, ServiceConfig, Transport, target_of


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (
        "MEGACITY_PORT",
        "MEGACITY_METRICS_PORT",
        "MEGACITY_PORT_OFFSET",
        "MEGACITY_TRANSPORT",
        "MEGACITY_SERVICE_HOST_TEMPLATE",
        "MEGACITY_TARGET_EXAM",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MEGACITY_DATABASE_URL", "postgresql://megacity_auth@127.0.0.1/megacity")
    monkeypatch.setenv("MEGACITY_REDIS_URL", "redis://127.0.0.1:6379/0")


def test_defaults_come_from_the_catalog() -> None:
    config = ServiceConfig.from_environment(load_catalog(), "auth")
    assert (config.port, config.metrics_port) == (7101, 9101)
    assert config.transport is Transport.MTLS
    assert config.identity == "spiffe://megacity.local/ns/megacity/sa/auth"


def test_port_offset_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGACITY_PORT_OFFSET", "1000")
    monkeypatch.setenv("MEGACITY_METRICS_PORT", "9999")
    config = ServiceConfig.from_environment(load_catalog(), "auth")
    assert (config.port, config.metrics_port) == (8101, 9999)


def test_peer_targets_follow_the_host_template(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = load_catalog()
    assert target_of(catalog.service("exam")) == "127.0.0.1:7103"
    monkeypatch.setenv("MEGACITY_SERVICE_HOST_TEMPLATE", "{name}.megacity.svc.cluster.local")
    assert target_of(catalog.service("exam")) == "exam.megacity.svc.cluster.local:7103"
    monkeypatch.setenv("MEGACITY_TARGET_EXAM", "10.0.0.7:9000")
    assert target_of(catalog.service("exam")) == "10.0.0.7:9000"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEGACITY_TRANSPORT", "carrier-pigeon", "expected mtls or linkerd"),
        ("MEGACITY_PORT", "eighty", "not an integer"),
        ("MEGACITY_SHUTDOWN_GRACE_SECONDS", "-1", "must not be negative"),
        ("MEGACITY_DATABASE_URL", "", "MEGACITY_DATABASE_URL"),
    ],
)
def test_unusable_values_are_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=message):
        ServiceConfig.from_environment(load_catalog(), "auth")


def test_services_without_dependencies_need_no_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEGACITY_DATABASE_URL")
    monkeypatch.delenv("MEGACITY_REDIS_URL")
    assert ServiceConfig.from_environment(load_catalog(), "asr").database_url is None

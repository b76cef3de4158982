"""Fixtures for every test (tests/support/), and a private temporary directory per test session."""

from __future__ import annotations

import shutil
import tempfile

import pytest

pytest_plugins = ["tests.support.mesh", "tests.support.infra", "tests.support.accounts", "tests.support.edge"]

_OWN_BASETEMP = pytest.StashKey[str]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Each session gets its own temporary root unless one is given. pytest's shared /tmp/pytest-of-<user> goes
    back to mode 700 whenever a session starts, and the embedded PostgreSQL runs as an unprivileged account that
    must cross it (ops/embedded.py): a second session would cut a running one off its databases."""
    if config.option.basetemp is None:
        config.option.basetemp = tempfile.mkdtemp(prefix="megacity-pytest-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_BASETEMP, None)
    if own is not None:
        shutil.rmtree(own, ignore_errors=True)

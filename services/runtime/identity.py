"""Who is calling: the workload identity of the peer, from the TLS session or from Linkerd.

With mTLS the identity is the SPIFFE ID in the client certificate (gRPC exposes it as `peer_spiffe_id`).
Behind Linkerd the proxy terminates mTLS and vouches for the client in the `l5d-client-id` header
(`<serviceaccount>.<namespace>.serviceaccount.identity.linkerd.<cluster-domain>`), which it sets itself
on every meshed request; the runtime maps it to the same catalog name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

import grpc

from services.runtime.catalog import Catalog
from services.runtime.config import Transport

LINKERD_CLIENT_ID = "l5d-client-id"
_KNOWN_LIMIT = 1024  # identities remembered; bounded even if a caller could choose what it presents
_Key = TypeVar("_Key", str, bytes)
_LINKERD_IDENTITY = re.compile(
    r"(?P<account>[a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(?P<namespace>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"\.serviceaccount\.identity\.linkerd\.[a-z0-9.-]+"
)

# Returns the caller's catalog name, or None when the call carries no identity the catalog knows.
Identify = Callable[[grpc.aio.ServicerContext[object, object]], str | None]


def from_linkerd_client_id(catalog: Catalog, client_id: str) -> str | None:
    match = _LINKERD_IDENTITY.fullmatch(client_id)
    if match is None or match["namespace"] != catalog.namespace:
        return None
    return catalog.name_of(catalog.spiffe_id(match["account"]))


def _remembered(known: dict[_Key, str], key: _Key, resolve: Callable[[_Key], str | None]) -> str | None:
    """The catalog name for `key`, resolved once: identities are checked on every call."""
    name = known.get(key)
    if name is None:
        name = resolve(key)
        if name is not None and len(known) < _KNOWN_LIMIT:
            known[key] = name
    return name


def identifier(catalog: Catalog, transport: Transport) -> Identify:
    if transport is Transport.LINKERD:
        known: dict[str, str] = {}

        def identify_linkerd(context: grpc.aio.ServicerContext[object, object]) -> str | None:
            for key, value in context.invocation_metadata() or ():
                if key == LINKERD_CLIENT_ID and isinstance(value, str):
                    return _remembered(known, value, lambda client_id: from_linkerd_client_id(catalog, client_id))
            return None

        return identify_linkerd

    known_ids: dict[bytes, str] = {}

    def identify_mtls(context: grpc.aio.ServicerContext[object, object]) -> str | None:
        # The certificate's SANs (peer_identities) are much cheaper to read than the whole auth_context();
        # like gRPC's own peer_spiffe_id, accept exactly one SPIFFE URI.
        spiffe_id = None
        for san in context.peer_identities() or ():
            if san.startswith(b"spiffe://"):
                if spiffe_id is not None:
                    return None
                spiffe_id = san
        if spiffe_id is None:
            return None
        return _remembered(known_ids, spiffe_id, lambda raw: catalog.name_of(raw.decode()))

    return identify_mtls

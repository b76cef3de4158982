"""The REST edge: Envoy configuration compiler, OpenAPI generator and rate-limit service."""

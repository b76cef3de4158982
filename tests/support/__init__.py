"""Shared test support: real servers, the probe service and mesh helpers."""

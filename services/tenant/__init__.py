"""Zones (which zone a host belongs to) and organisations."""

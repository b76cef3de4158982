"""Long-running AI jobs over Redis Streams and per-org AI credits."""

"""Inference servers: model hosts behind the kzone, tutor and jobs services; internal only."""

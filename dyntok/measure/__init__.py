"""Measurement: analytic MACs, accuracy and speed, one protocol for every method."""

"""Measurement: latency timing, parameters, FLOPs, memory; the bench and its reports."""

"""Numerical operators with interchangeable backends (see ``selective_scan``)."""

from edgediag.ops.selective_scan import (
    BACKENDS,
    DEFAULT_CHUNK_SIZE,
    available_backends,
    export_chunk_size,
    forced_backend,
    is_tracing,
    resolve_backend,
    scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_cpu,
    selective_scan_cuda,
    selective_scan_ref,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "available_backends",
    "export_chunk_size",
    "forced_backend",
    "is_tracing",
    "resolve_backend",
    "scan_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_cpu",
    "selective_scan_cuda",
    "selective_scan_ref",
]

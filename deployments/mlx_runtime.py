"""MLX in a model replica's process: a fast BLAS under MLX's CPU backend, before MLX loads.

The Linux `mlx[cpu]` wheel links netlib's reference BLAS (float32 matmul ~6 GFLOP/s on
these 2 cores); OpenBLAS does the same matmul at ~200 GFLOP/s (measured here: 203-207). Loading
OpenBLAS's `libblas.so.3` with RTLD_GLOBAL before MLX's library is loaded makes MLX's BLAS
calls bind to it, as LD_PRELOAD would, without an environment variable that every Ray
process would inherit. It must happen before the first `import mlx` of the process (MLX's
extension is bound at load); `MLX_FLEET_BLAS` names another library, or `reference` keeps
the bundled one. macOS uses Accelerate and Metal: nothing to do there.

Importing this module does it: a model replica's worker imports it first of all, in Ray's
setup hook (`deployments.warm_workers`), so a model's first load finds MLX ready.

It also imports mlx-lm, whose `utils` sets the open-file limit to (2048, 4096) in every
process that imports it, and a lowered hard limit cannot be raised again; a replica serving
many streams holds many files. The import here keeps that call from lowering either limit.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

from policies.logs import module_logger

logger = module_logger(__name__)

BLAS_ENV = "MLX_FLEET_BLAS"
# Debian/Ubuntu's OpenBLAS (`libopenblas0-pthread`; `make setup` installs it), then others'.
OPENBLAS_CANDIDATES = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def find_blas() -> str | None:
    """The optimized BLAS to put under MLX here, or None (not Linux, none found, or refused)."""
    chosen = os.environ.get(BLAS_ENV, "")
    if chosen == "reference" or not sys.platform.startswith("linux"):
        return None
    if chosen:
        return chosen
    arch = platform.machine()
    for candidate in OPENBLAS_CANDIDATES:
        path = Path(candidate.format(arch=arch))
        if path.exists():
            return str(path)
    return None


def _load_blas() -> str | None:
    if "mlx.core" in sys.modules:
        logger.warning("MLX was imported before its BLAS could be chosen: it keeps the bundled one")
        return None
    path = find_blas()
    if path is None:
        if sys.platform.startswith("linux") and os.environ.get(BLAS_ENV) != "reference":
            logger.warning(
                "no OpenBLAS found: MLX's CPU backend runs on its reference BLAS, about 30x slower "
                "for float32 matmuls (install Debian's libopenblas0-pthread, or set %s)", BLAS_ENV
            )
        return None
    # One core left to the request path (ingress, proxy, Ray) that shares the machine: on 2
    # cores, server decode rose from 60/155/241 to 63/205/275 tok/s at 1/4/8 streams with one
    # BLAS thread instead of two (bench/throughput.py, bench model).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(max(1, (os.cpu_count() or 2) - 1)))
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        logger.warning("could not load BLAS %s (%s): MLX keeps its reference BLAS", path, error)
        return None
    return path


def _import_mlx_lm_keeping_file_limit() -> None:
    import resource

    set_limit = resource.setrlimit

    def never_lower(kind: int, limits: tuple[int, int]) -> None:
        if kind != resource.RLIMIT_NOFILE:
            return set_limit(kind, limits)
        soft, hard = resource.getrlimit(kind)
        wanted = limits[0] if hard == resource.RLIM_INFINITY else min(limits[0], hard)
        set_limit(kind, (soft if soft == resource.RLIM_INFINITY else max(soft, wanted), hard))

    resource.setrlimit = never_lower
    try:
        import mlx_lm.utils  # noqa: F401
    finally:
        resource.setrlimit = set_limit


BLAS: str | None = _load_blas()
_import_mlx_lm_keeping_file_limit()

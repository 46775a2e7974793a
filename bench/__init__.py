"""Benchmarks (`python -m bench`). In-process references run MLX under the same BLAS as the
model replicas, so that a ratio compares the server with the same MLX."""

import deployments.mlx_runtime  # noqa: F401  (before any MLX import: it chooses MLX's BLAS)

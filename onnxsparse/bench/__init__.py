"""GPU benchmark of a model's own layer shapes: GEMM extraction (CPU) and cuSPARSELt vs cuBLAS timing (GPU)."""

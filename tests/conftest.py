import jax

# CPU tests compare against float64 references; keep jax's default f32 but make every
# matmul exact f32 (the CPU default already is; this guards against backend changes).
jax.config.update("jax_default_matmul_precision", "highest")

"""Models in Flax NNX whose linear layers accept quantized kernels (``svdq_jax.models``)."""

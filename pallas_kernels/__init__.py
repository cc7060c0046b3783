"""Standalone Pallas kernels for mixed-bit MoE experts: bit packing and grouped matmuls.

``packing`` holds the dense uint32 bit-plane layout; ``grouped_matmul`` the grouped kernels,
their plain-jnp references and the XLA fallback. Nothing here imports ``mode_jax``.
"""

"""mode-jax: MoE multimodal models (Kimi-VL, Qwen3-VL-MoE, InternVL3.5-MoE) in Flax NNX, and
their expert-level mixed-precision post-training quantization.

`mode_jax.load(path_or_torch_model, dtype=...)` converts a checkpoint (see `mode_jax.api`). It is
imported on first use so that `import mode_jax.<subpackage>` stays light.
"""


def __getattr__(name):
    if name == "load":
        from mode_jax.api import load

        return load
    raise AttributeError(f"module 'mode_jax' has no attribute {name!r}")


__all__ = ["load"]

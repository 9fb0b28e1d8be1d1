"""moe_jax: a JAX/Flax trainer for Mixture-of-Experts transformers trained with Muon."""

__version__ = "0.1.0"

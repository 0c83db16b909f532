"""dalle_jax: a JAX/Flax text-to-image system in the shape of DALL-E 2."""

__version__ = "0.1.0"

"""arctic-jax: fast LLM inference on JAX and Pallas."""
from arctic_jax.llm import LLM, CompletionOutput  # noqa: F401
from arctic_jax.sampling import SamplingParams  # noqa: F401

__all__ = ["LLM", "CompletionOutput", "SamplingParams"]

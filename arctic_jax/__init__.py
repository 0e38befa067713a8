"""arctic-jax: fast LLM inference on JAX and Pallas."""

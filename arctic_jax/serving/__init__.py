"""OpenAI-compatible HTTP serving: ``arctic-jax serve`` (see ``app.create_app``)."""

"""Training Arctic draft models (``arctic-jax train-speculator``): prompts available offline
(``prompts``), self-distilled generations with the base model's hidden states (``hidden_states``,
``data``), and the optax training loop with its held-out evaluation (``trainer``).

Submodules import jax and the model stack only when used; ``cli_command`` stays cheap to import.
"""

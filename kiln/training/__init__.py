"""The shared training loop and its parts: batching, optimisation, precision, checkpoints."""

"""preftune: preference alignment for causal language models."""

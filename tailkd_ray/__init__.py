"""tailkd-ray: distil a causal LM into a smaller one with the tail-aware divergence (TAD) on Ray."""

__version__ = "0.1.0"

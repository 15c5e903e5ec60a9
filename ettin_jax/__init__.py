"""ettin-jax: pre-training the Ettin encoders and decoders (ModernBERT architecture) in JAX."""

"""The core engine: backbone adapters, attention hooks and token alignment."""

"""encoding-service: latent codes of binary vectors over HTTP."""

__version__ = "0.1.0"

"""Launch tooling for Cloud TPU VM pods (see launch/README.md)."""

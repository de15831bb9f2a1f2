"""Train-step steps/s on one XLA CPU device per core vs one device (see README.md)."""

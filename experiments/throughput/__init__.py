"""Training and sampling throughput of the denoisers and their MFU (see README.md)."""

"""Samplers at several NFE against exact ground truth or a trained run (see README.md)."""

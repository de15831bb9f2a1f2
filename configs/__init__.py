"""Experiment configs: each file has get_config(arg); base.py defines every key."""

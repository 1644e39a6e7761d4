"""Experiment configs: one `get_config(variant)` per file.

Run one with `python -m mmdiff_jax.train --config=configs/<file>.py[:variant] --workdir=<dir>`.
"""

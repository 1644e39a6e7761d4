"""Experiment configs: one `get_config(preset)` per file; the presets the experiments share are in presets.py.

Run one with `python -m mmdiff_jax.train --config=configs/<file>.py[:preset] --workdir=<dir>`.
"""

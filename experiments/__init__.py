"""Experiments: a config file (configs/<name>.py) plus what is specific to the experiment (its modalities,
metrics and baselines) on top of the shared machinery in `experiments.common`.

  masked_pretrain  image + masked image: restoration at several mask ratios, unconditional samples
                   (python -m experiments.masked_pretrain)
"""

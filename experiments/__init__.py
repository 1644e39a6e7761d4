"""Experiments: a config file (configs/<name>.py) plus what is specific to the experiment (its modalities,
metrics and baselines) on top of the shared machinery in `experiments.common` and `experiments.baselines`.

  masked_pretrain     image + masked image: restoration at several mask ratios, unconditional samples
  joint_image_label   image + class label
  image_segmentation  multi-object scenes + segmentation masks
  image_embedding     image + embedding vector

Run one with `python -m experiments.<name>` (see its config's docstring for the presets).
"""

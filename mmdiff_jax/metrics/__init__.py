"""Evaluation metrics: small plug-in evaluators with one interface (see `base`).

  evaluators = make_evaluators(["psnr", ("ssim", {"region": "masked"}), "fid"])
  results = evaluate(evaluators, batches)   # {"psnr": ..., "ssim_masked": ..., "fid_fmnist_cnn": ...}

Registered evaluators (name -> reported keys):
  psnr, ssim                 "psnr"/"psnr_masked", "ssim"/"ssim_masked"   (image_quality, dm-pix)
  lpips_vgg                  "lpips_vgg": VGG-16 LPIPS, official weights   (lpips; user-given VGG weights)
  perceptual_fmnist_cnn      "perceptual_fmnist_cnn": LPIPS-style, uncalibrated, on the
                             Fashion-MNIST classifier's features; offline; NOT LPIPS  (features)
  fid, precision_recall,     "fid_<features>", "precision_<features>", "recall_<features>"
  feature_distribution       (distribution; features "fmnist_cnn", "inception_v3" or any callable)
  accuracy, label_agreement, "accuracy", "label_agreement", "miou"        (agreement)
  miou

Every metric is also a plain function: image_quality.psnr / ssim,
lpips.lpips_distance, features.perceptual_distance, distribution.fid /
frechet_distance / precision_recall, agreement.accuracy / label_agreement /
mean_iou; inception.inception_features is FID's Inception-V3 (user-given weights).
"""

from mmdiff_jax.metrics import agreement
from mmdiff_jax.metrics import distribution
from mmdiff_jax.metrics import features
from mmdiff_jax.metrics import image_quality
from mmdiff_jax.metrics import inception
from mmdiff_jax.metrics import lpips
from mmdiff_jax.metrics.base import Evaluator
from mmdiff_jax.metrics.base import MeanEvaluator
from mmdiff_jax.metrics.base import check_specs
from mmdiff_jax.metrics.base import evaluate
from mmdiff_jax.metrics.base import evaluator_needs
from mmdiff_jax.metrics.base import make_evaluator
from mmdiff_jax.metrics.base import make_evaluators
from mmdiff_jax.metrics.base import parse_spec
from mmdiff_jax.metrics.base import register
from mmdiff_jax.metrics.base import registered_evaluators

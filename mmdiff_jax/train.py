"""Command line entry point: trains the MT-Diffusion model of any config file (`tasks.make_mt_diffusion_task`).

  python -m mmdiff_jax.train --config=configs/default.py --workdir=workdirs/default
  python -m mmdiff_jax.train --config=configs/default.py:tiny --config.train.steps=100 --workdir=/tmp/x

`--config.<key>=<value>` overrides any key (unknown keys are errors); multi-host runs add
`--config.distributed.coordinator_address=host:port --config.distributed.num_processes=N
--config.distributed.process_id=i` where no launcher (SLURM, TPU, Open MPI) sets them.
Exit status 0 also after a preemption (SIGTERM): the run saved a checkpoint and resumes when relaunched.
Orbax's INFO logs (several lines per checkpoint) are hidden unless --verbosity=1.
A mistake in the flags (an unknown flag or config key, a bad value, a --workdir that is a file) ends in one
line naming the flag, exit status 2; MMDIFF_DEBUG=1 shows the traceback (`training.cli`).
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mmdiff_jax import tasks
from mmdiff_jax.training import cli, initialize_distributed, train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (a get_config() module).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples, config.json.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietOrbax(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        # Checkpoints saved between evaluations carry no metric for the best-checkpoint policy: expected.
        return record.levelno >= logging.WARNING and "did not provide metrics" not in record.getMessage()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.check_directory_flag("workdir", _WORKDIR.value)
    if absl_logging.get_verbosity() < 1:
        absl_logging.get_absl_handler().addFilter(_QuietOrbax())
    config = cli.config_value(flags.FLAGS[_CONFIG.name])
    initialize_distributed(config.distributed)  # before the task's first JAX computation
    train_and_evaluate(config, _WORKDIR.value, tasks.make_mt_diffusion_task(config))  # errors: `cli.reported`


if __name__ == "__main__":
    cli.run(main)

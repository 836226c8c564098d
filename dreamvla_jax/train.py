"""Train DreamVLA on a prepared CALVIN-format dataset and its teacher-feature store.

  python -m dreamvla_jax.train --config configs/calvin.py[:preset] --workdir runs/NAME \
      --config.data.root=DATA --config.data.features=STORE [--config.train.steps=N ...]

Public flags (used by scripts): --config.data.root, --config.data.features, --config.train.steps,
--config.train.log_every, --config.checkpoint.every, --config.seed. Rerunning the same command resumes
from the latest checkpoint in --workdir; SIGTERM saves a checkpoint and exits.

Several processes (hosts): the same command on each, plus --coordinator HOST:PORT --num-processes N
--process-id I (or SLURM / TPU pod detection, see dreamvla_jax/distributed.py and launch/README.md).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags
from ml_collections import config_flags

from dreamvla_jax import cli, distributed

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/calvin.py', 'Config file[:preset].')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (checkpoints, metrics.jsonl, tb/).')

PREPARE_HINT = ("prepare a dataset with `python -m dreamvla_jax.envs.collect --out DIR` (built-in tabletop) "
                "or point to a CALVIN split, then run `python -m dreamvla_jax.teachers --data DIR --out STORE`")


def check_data_flags(config) -> None:
    root, features = config.data.root, config.data.features
    if not root:
        raise cli.UsageError(f"--config.data.root is not set; {PREPARE_HINT}.")
    if not Path(root).is_dir():
        raise cli.UsageError(f"--config.data.root {root} does not exist; {PREPARE_HINT}.")
    if not features:
        raise cli.UsageError(f"--config.data.features is not set; {PREPARE_HINT}.")
    if not Path(features).is_dir():
        raise cli.UsageError(f"--config.data.features {features} does not exist; {PREPARE_HINT}.")


def main(argv):
    del argv
    if not _WORKDIR.value:
        raise cli.UsageError("--workdir is required (the run directory; rerun the same command to resume).")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save step at INFO
    distributed.initialize_from_flags()  # before anything touches the devices
    if not distributed.is_main_process():
        logging.set_verbosity(logging.ERROR)  # process 0 speaks for the job
    config = _CONFIG.value
    check_data_flags(config)
    distributed.check_global_batch(config.train.batch_size)
    from dreamvla_jax.training.loop import train

    last = train(config, _WORKDIR.value)
    if last and distributed.is_main_process():
        print(f"Done: step {last.get('step', '?')} loss {last.get('loss', float('nan')):.5f}; "
              f"metrics in {Path(_WORKDIR.value) / 'metrics.jsonl'}")


if __name__ == '__main__':
    cli.run(main)

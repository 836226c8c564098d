"""calvin_env behind ``dreamvla_jax.envs.base.Env``, built only when the user has installed CALVIN.

calvin_env is never vendored and never imported at module import time: ``make_calvin_env`` imports it
and, when that fails, raises one sentence saying how to install it (CALVIN.md section 2).

Two ways to build the simulator, as CALVIN.md section 2 describes:
  * official: ``get_env(<dataset>/validation)``, which instantiates the split's
    ``.hydra/merged_config.yaml`` (the render settings the dataset was recorded with);
  * without the dataset: a hydra compose of calvin_env's ``conf/config_data_collection.yaml`` with scene D,
    the longer-finger Panda and the static + gripper cameras (equality with the recording config is
    unverified, so the official path is preferred when the dataset is there).
The task oracle is calvin_env's ``Tasks`` with ``conf/tasks/new_playtable_tasks.yaml`` (identical to the
file calvin's evaluator loads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dreamvla_jax.envs.base import binarize_gripper
from dreamvla_jax.envs.calvin_protocol import VALIDATION_INSTRUCTIONS

INSTALL_HINT = (
    "calvin_env is not installed (`import calvin_env` failed): install CALVIN's simulator with "
    "`git clone --recurse-submodules https://github.com/mees/calvin.git && cd calvin/calvin_env/tacto && "
    "pip install -e . && cd .. && pip install -e .` (README, section Evaluation), "
    "or evaluate with --env tabletop.")

_COMPOSE_OVERRIDES = ('scene=calvin_scene_D', 'robot=panda_longer_finger', 'cameras=static_and_gripper',
                      'use_vr=false')


class CalvinEnvMissing(ImportError):
    """calvin_env (or one of its dependencies) cannot be imported."""


def _import_calvin_env():
    try:
        import calvin_env  # noqa: F401
        import hydra  # noqa: F401
        from omegaconf import OmegaConf  # noqa: F401
    except ImportError as e:
        raise CalvinEnvMissing(f"{INSTALL_HINT} ({e})") from e
    return calvin_env


def calvin_env_available() -> bool:
    """Whether ``import calvin_env`` works in this Python."""
    try:
        _import_calvin_env()
    except CalvinEnvMissing:
        return False
    return True


class CalvinEnv:
    """A calvin_env ``PlayTableSimEnv`` with the oracle attached (``base.Env``).

    ``step`` binarises the gripper as calvin's wrapper does and passes a copy: the pinned calvin_env scales
    the caller's action array in place (CALVIN.md section 1).
    """

    task_names = list(VALIDATION_INSTRUCTIONS)
    instructions = dict(VALIDATION_INSTRUCTIONS)

    def __init__(self, env, tasks):
        self.env = env
        self.tasks = tasks

    def reset(self, robot_obs=None, scene_obs=None, seed=None):
        del seed  # calvin's evaluation fixes the whole state through robot_obs/scene_obs
        return self.env.reset(robot_obs=robot_obs, scene_obs=scene_obs)

    def step(self, action):
        return self.env.step(binarize_gripper(np.asarray(action)))

    def get_obs(self):
        return self.env.get_obs()

    def get_info(self):
        return self.env.get_info()

    def close(self):
        self.env.close()


def _conf_dir(calvin_env_module) -> Path:
    return Path(calvin_env_module.__file__).resolve().parents[1] / 'conf'


def make_calvin_env(dataset_root: str | None = None, *, show_gui: bool = False) -> CalvinEnv:
    """Builds the CALVIN evaluation environment.

    Args:
      dataset_root: a CALVIN split root (``task_ABC_D``: the folder holding ``validation/``) or the
        ``validation`` folder itself. When it holds ``.hydra/merged_config.yaml`` the env is built from it
        exactly as the official evaluator does; None builds scene D from calvin_env's own configs.
      show_gui: open pybullet's GUI.
    Raises:
      CalvinEnvMissing: calvin_env is not importable (message: how to install it).
      FileNotFoundError: ``dataset_root`` is given but has no merged config.
    """
    calvin_env = _import_calvin_env()
    import hydra
    from omegaconf import OmegaConf

    conf = _conf_dir(calvin_env)
    if dataset_root is not None:
        root = Path(dataset_root)
        split = root if (root / '.hydra' / 'merged_config.yaml').is_file() else root / 'validation'
        if not (split / '.hydra' / 'merged_config.yaml').is_file():
            raise FileNotFoundError(
                f"--calvin-root {dataset_root}: no validation/.hydra/merged_config.yaml (expected a "
                "CALVIN dataset root such as task_ABC_D); omit --calvin-root to build scene D from "
                "calvin_env's configs.")
        from calvin_env.envs.play_table_env import get_env

        env = get_env(split, show_gui=show_gui)
    else:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        with hydra.initialize_config_dir(config_dir=str(conf), version_base=None):
            cfg = hydra.compose('config_data_collection', overrides=list(_COMPOSE_OVERRIDES))
        env = hydra.utils.instantiate(cfg.env, show_gui=show_gui, use_vr=False, use_scene_info=True)
    tasks = hydra.utils.instantiate(OmegaConf.load(conf / 'tasks' / 'new_playtable_tasks.yaml'))
    return CalvinEnv(env, tasks)

"""Chained rollouts: K environments (in-process or one worker process each) driven by ONE batched policy.

Each environment slot runs episodes from a shared queue. An episode is a chain of subtasks from one reset
(CALVIN: five; the tabletop benchmark: one). Per subtask, exactly as calvin's ``rollout()``:
``obs = env.get_obs()``, ``policy.reset(env_index=k)``, ``start_info = env.get_info()``, then up to
``max_steps`` x (policy action -> ``env.step``), success as soon as
``env.tasks.get_task_info_for_set(start_info, info, {subtask})`` is non-empty. The first failed subtask
ends the chain; the episode's result is the number of subtasks completed. There is no reset between the
subtasks of a chain.

Every step the main process gathers the newest observation of all slots and calls ``policy.step`` once
for the batch; slots whose chain ended (and no episode is left) still fill their row with their last
observation (the policy is built for a fixed batch) and their actions are dropped. The success check runs
next to the environment (in the worker), so only observations and one flag cross the pipe.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Episode:
    """One chain: reset with ``reset_kwargs`` (``robot_obs``/``scene_obs``/``seed``), then the subtasks."""

    index: int
    subtasks: tuple[str, ...]
    instructions: tuple[str, ...]
    reset_kwargs: dict = field(default_factory=dict)


@dataclass
class StepEvent:
    """What a recorder sees after every environment step."""

    slot: int
    episode: Episode
    subtask: int           # index into episode.subtasks of the subtask being attempted
    step: int              # 1-based step within the subtask
    obs: dict              # observation after the step
    success: bool          # this step completed the subtask


class EnvRunner:
    """Owns one environment and the oracle state of the current subtask (runs inside a worker)."""

    def __init__(self, make_env: Callable[[], object]):
        self.env = make_env()
        self.start_info = None
        self.task = None

    def reset(self, reset_kwargs: dict) -> dict:
        return self.env.reset(**reset_kwargs)

    def begin(self, task: str) -> dict:
        """Starts a subtask: the observation the policy acts on first, and the oracle's reference info."""
        obs = self.env.get_obs()
        self.start_info = self.env.get_info()
        self.task = task
        return obs

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        obs, _, _, info = self.env.step(np.array(action, dtype=np.float64))
        done = self.env.tasks.get_task_info_for_set(self.start_info, info, {self.task})
        return obs, bool(done)

    def close(self) -> None:
        self.env.close()

    def handle(self, cmd: str, payload):
        if cmd == 'reset':
            return self.reset(payload)
        if cmd == 'begin':
            return self.begin(payload)
        if cmd == 'step':
            return self.step(payload)
        raise ValueError(f"unknown command {cmd!r}")


class LocalSlot:
    """An environment in this process, with the same send/recv surface as a worker."""

    def __init__(self, make_env):
        self.runner = EnvRunner(make_env)
        self._result = None

    def send(self, cmd: str, payload=None) -> None:
        self._result = self.runner.handle(cmd, payload)

    def recv(self):
        return self._result

    def close(self) -> None:
        self.runner.close()


def _worker_main(conn, make_env) -> None:
    """Worker loop: build the env, then answer commands until 'close'. Errors go back to the parent."""
    try:
        runner = EnvRunner(make_env)
        conn.send(('ok', None))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(('error', _portable(e)))
        conn.close()
        return
    while True:
        try:
            cmd, payload = conn.recv()
        except EOFError:
            break
        if cmd == 'close':
            runner.close()
            conn.send(('ok', None))
            break
        try:
            conn.send(('ok', runner.handle(cmd, payload)))
        except BaseException as e:  # noqa: BLE001
            conn.send(('error', _portable(e)))
    conn.close()


def _portable(e: BaseException) -> BaseException:
    """The exception itself when it pickles (so the parent re-raises the same type), else a RuntimeError
    carrying the worker's traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"environment worker failed:\n{traceback.format_exc()}")


class ProcessSlot:
    """An environment in its own spawned process (pybullet clients and EGL contexts are per process)."""

    def __init__(self, make_env, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, make_env), daemon=True)
        self.proc.start()
        child.close()

    def wait_ready(self) -> None:
        self.recv()

    def send(self, cmd: str, payload=None) -> None:
        self.conn.send((cmd, payload))

    def recv(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"environment worker {self.proc.pid} died "
                               f"(exit code {self.proc.exitcode})") from None
        if status == 'error':
            raise value
        return value

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(('close', None))
                self.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                pass
        self.proc.join(timeout=10)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()
        self.conn.close()


class EnvPool:
    """``num`` environment slots: ``workers`` <= 1 -> one in-process env; else one spawned process each.

    ``make_env`` must be picklable (a module-level function or a ``functools.partial`` of one) when
    ``workers`` > 1. Use as a context manager so the workers are always shut down.
    """

    def __init__(self, make_env: Callable[[], object], workers: int = 0):
        n = max(1, int(workers))
        if n == 1:
            self.slots = [LocalSlot(make_env)]
        else:
            ctx = mp.get_context('spawn')
            self.slots = []
            try:
                for _ in range(n):
                    self.slots.append(ProcessSlot(make_env, ctx))
                for s in self.slots:
                    s.wait_ready()
            except BaseException:
                self.close()
                raise

    def __len__(self) -> int:
        return len(self.slots)

    def close(self) -> None:
        for s in self.slots:
            s.close()
        self.slots = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _broadcast(slots, ids: Sequence[int], cmd: str, payloads: Sequence) -> list:
    """Sends one command to several slots, then collects the answers (workers run concurrently)."""
    for i, p in zip(ids, payloads, strict=True):
        slots[i].send(cmd, p)
    return [slots[i].recv() for i in ids]


def run_episodes(policy, pool: EnvPool, episodes: Sequence[Episode], *, max_steps: int,
                 on_episode_end: Callable[[Episode, int], None] | None = None,
                 on_step: Callable[[StepEvent], None] | None = None,
                 on_subtask_start: Callable[[int, Episode, int, dict], None] | None = None,
                 on_policy_step: Callable[[list, list, list], None] | None = None) -> list[int]:
    """Runs every episode and returns the number of subtasks each completed (in ``episodes`` order).

    Args:
      policy: ``reset(env_index)``, ``step(observations, instructions) -> [N, 7]``; ``num_envs`` (if
        present) must be >= the number of slots (extra rows are filled with copies and ignored).
      pool: the environments.
      max_steps: step budget per subtask (CALVIN: 360).
      on_episode_end: called with ``(episode, n_completed)`` as chains finish (progress bars).
      on_step: called after every environment step (videos, panels).
      on_subtask_start: called with ``(slot, episode, subtask, obs)`` when a subtask starts.
      on_policy_step: called after each policy call with ``(observations, instructions, states)``,
        ``states`` = ``[(slot, episode, subtask, steps_so_far)]`` of the active slots (dream panels).
    """
    slots = pool.slots
    n = len(slots)
    rows = int(getattr(policy, 'num_envs', n))
    if rows < n:
        raise ValueError(f"the policy is built for {rows} environments but the pool has {n}")
    queue = deque(episodes)
    results: dict[int, int] = {}
    current: list[Episode | None] = [None] * n
    sub = [0] * n
    steps = [0] * n
    last_obs: list[dict | None] = [None] * n
    needs_begin: list[int] = []

    def finish(k: int, n_done: int) -> None:
        ep = current[k]
        results[ep.index] = n_done
        current[k] = None
        if on_episode_end is not None:
            on_episode_end(ep, n_done)

    while True:
        # New chains for free slots (reset every env first, then begin their first subtask together).
        free = []
        for k in range(n):
            if current[k] is None and queue:
                current[k], sub[k] = queue.popleft(), 0
                free.append(k)
        if free:
            _broadcast(slots, free, 'reset', [current[k].reset_kwargs for k in free])
            needs_begin = sorted(set(needs_begin) | set(free))
        if needs_begin:
            obs = _broadcast(slots, needs_begin, 'begin', [current[k].subtasks[sub[k]] for k in needs_begin])
            for k, o in zip(needs_begin, obs, strict=True):
                last_obs[k], steps[k] = o, 0
                policy.reset(env_index=k)
                if on_subtask_start is not None:
                    on_subtask_start(k, current[k], sub[k], o)
            needs_begin = []
        active = [k for k in range(n) if current[k] is not None]
        if not active:
            break

        # One batched policy call; idle rows repeat an active observation (their actions are dropped).
        filler = last_obs[active[0]]
        batch_obs = [last_obs[k] if current[k] is not None else filler for k in range(n)]
        instr = [current[k].instructions[sub[k]] if current[k] is not None
                 else current[active[0]].instructions[sub[active[0]]] for k in range(n)]
        batch_obs += [filler] * (rows - n)
        instr += [instr[active[0]]] * (rows - n)
        actions = np.asarray(policy.step(batch_obs, instr))
        if actions.shape != (rows, 7):
            raise ValueError(f"policy.step returned actions of shape {actions.shape}, expected ({rows}, 7)")
        if on_policy_step is not None:
            on_policy_step(batch_obs, instr, [(k, current[k], sub[k], steps[k]) for k in active])

        answers = _broadcast(slots, active, 'step', [actions[k] for k in active])
        for k, (o, success) in zip(active, answers, strict=True):
            last_obs[k] = o
            steps[k] += 1
            ep = current[k]
            if on_step is not None:
                on_step(StepEvent(k, ep, sub[k], steps[k], o, success))
            if success:
                sub[k] += 1
                if sub[k] == len(ep.subtasks):
                    finish(k, sub[k])
                else:
                    needs_begin.append(k)
            elif steps[k] >= max_steps:
                finish(k, sub[k])
    return [results[ep.index] for ep in episodes]

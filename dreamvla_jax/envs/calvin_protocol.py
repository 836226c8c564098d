"""CALVIN's long-horizon evaluation protocol, reimplemented without calvin_agent (CALVIN.md sections 3-4).

What must match the official evaluator exactly:
  * the 1000 five-task chains of ``get_sequences`` (calvin_agent/evaluation/multistep_sequences.py): the
    symbolic world, the task pre/post-conditions and categories, and the legacy-numpy random streams that
    pick and shuffle them (same seeds, same draws, so the same chains in the same order);
  * the reset state of each chain (``get_env_state_for_initial_condition`` in calvin_agent's utils.py),
    seeded by pyhash's FNV-1 32 of ``str(state.values())``;
  * the validation instruction of each task (conf/annotations/new_playtable_validation.yaml);
  * the metrics (``count_success``, average successful length, per-task success/total).

Generating 1000 chains takes CALVIN's code ~260 s; here the precondition checks are memoised on a
hashable symbolic state, which leaves the random draws as the cost (~20 s on one core), and the result is
cached on disk (``cache_dir``).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EP_LEN = 360          # steps per subtask (evaluate_policy.py)
NUM_SEQUENCES = 1000  # chains in the official evaluation
CHAIN_LENGTH = 5
_CACHE_VERSION = 1

BLOCK_COLORS = ('red', 'blue', 'pink')
# Symbolic state variables, in the key order of calvin's ``possible_conditions`` (the reset seed hashes
# ``str(state.values())``, so this order is part of the protocol).
STATE_KEYS = ('led', 'lightbulb', 'slider', 'drawer', 'red_block', 'blue_block', 'pink_block', 'grasped')
_INITIAL_VALUES = {
    'led': (0, 1),
    'lightbulb': (0, 1),
    'slider': ('right', 'left'),
    'drawer': ('closed', 'open'),
    'red_block': ('table', 'slider_right', 'slider_left'),
    'blue_block': ('table', 'slider_right', 'slider_left'),
    'pink_block': ('table', 'slider_right', 'slider_left'),
    'grasped': (0,),
}

VALIDATION_INSTRUCTIONS = {
    **{f'rotate_{c}_block_{d}': f'take the {c} block and rotate it to the {d}'
       for c in BLOCK_COLORS for d in ('right', 'left')},
    **{f'push_{c}_block_{d}': f'go push the {c} block {d}' for c in BLOCK_COLORS for d in ('right', 'left')},
    'move_slider_left': 'push the sliding door to the left side',
    'move_slider_right': 'push the sliding door to the right side',
    'open_drawer': 'pull the handle to open the drawer',
    'close_drawer': 'push the handle to close the drawer',
    **{f'lift_{c}_block_table': f'grasp and lift the {c} block' for c in BLOCK_COLORS},
    **{f'lift_{c}_block_slider': f'lift the {c} block from the sliding cabinet' for c in BLOCK_COLORS},
    **{f'lift_{c}_block_drawer': f'Take the {c} block from the drawer' for c in BLOCK_COLORS},
    'place_in_slider': 'store the grasped block in the sliding cabinet',
    'place_in_drawer': 'store the grasped block in the drawer',
    'push_into_drawer': 'slide the block that it falls into the drawer',
    'stack_block': 'stack the grasped block',
    'unstack_block': 'remove the stacked block',
    'turn_on_lightbulb': 'use the switch to turn on the light bulb',
    'turn_off_lightbulb': 'use the switch to turn off the light bulb',
    'turn_on_led': 'press the button to turn on the led light',
    'turn_off_led': 'press the button to turn off the led light',
}


def _task_rules() -> dict[str, list[tuple[dict, dict]]]:
    """Task -> alternatives ``(condition, effect)`` over the symbolic state.

    A condition value that is a tuple means "any of these". The dict ORDER is calvin's ``tasks`` order:
    chains are drawn as indices into it, so reordering would change every chain.
    """
    def blk(c):
        return f'{c}_block'

    rules: dict[str, list[tuple[dict, dict]]] = {}
    for kind in ('rotate', 'push'):
        for c in BLOCK_COLORS:
            for d in ('right', 'left'):
                rules[f'{kind}_{c}_block_{d}'] = [({blk(c): 'table', 'grasped': 0}, {blk(c): 'table'})]
    rules['move_slider_left'] = [({'slider': 'right', 'grasped': 0}, {'slider': 'left'})]
    rules['move_slider_right'] = [({'slider': 'left', 'grasped': 0}, {'slider': 'right'})]
    rules['open_drawer'] = [({'drawer': 'closed', 'grasped': 0}, {'drawer': 'open'})]
    rules['close_drawer'] = [({'drawer': 'open', 'grasped': 0}, {'drawer': 'closed'})]
    for c in BLOCK_COLORS:
        lifted = {blk(c): 'grasped', 'grasped': 1}
        rules[f'lift_{c}_block_table'] = [({blk(c): 'table', 'grasped': 0}, lifted)]
        # A block in one half of the sliding cabinet is reachable only when the door covers the other half.
        rules[f'lift_{c}_block_slider'] = [
            ({blk(c): 'slider_left', 'slider': 'right', 'grasped': 0}, lifted),
            ({blk(c): 'slider_right', 'slider': 'left', 'grasped': 0}, lifted)]
        rules[f'lift_{c}_block_drawer'] = [({blk(c): 'drawer', 'drawer': 'open', 'grasped': 0}, lifted)]
    rules['place_in_slider'] = [
        ({blk(c): 'grasped', 'slider': side, 'grasped': 1}, {blk(c): f'slider_{side}', 'grasped': 0})
        for c in BLOCK_COLORS for side in ('right', 'left')]
    rules['place_in_drawer'] = [
        ({blk(c): 'grasped', 'drawer': 'open', 'grasped': 1}, {blk(c): 'drawer', 'grasped': 0})
        for c in BLOCK_COLORS]
    pairs = [(top, bottom) for top in BLOCK_COLORS for bottom in BLOCK_COLORS if top != bottom]
    rules['stack_block'] = [
        ({blk(t): 'grasped', blk(b): 'table', 'grasped': 1},
         {blk(t): 'stacked_top', blk(b): 'stacked_bottom', 'grasped': 0}) for t, b in pairs]
    rules['unstack_block'] = [
        ({blk(t): 'stacked_top', blk(b): 'stacked_bottom', 'grasped': 0}, {blk(t): 'table', blk(b): 'table'})
        for t, b in pairs]
    for name, key in (('lightbulb', 'lightbulb'), ('led', 'led')):
        rules[f'turn_on_{name}'] = [({key: 0, 'grasped': 0}, {key: 1})]
        rules[f'turn_off_{name}'] = [({key: 1, 'grasped': 0}, {key: 0})]
    # Push a block off the table into the open drawer: only when the other two blocks are in the cabinet.
    rules['push_into_drawer'] = []
    for c in BLOCK_COLORS:
        cond = {blk(c): 'table', 'drawer': 'open', 'grasped': 0}
        cond.update({blk(o): ('slider_right', 'slider_left') for o in BLOCK_COLORS if o != c})
        rules['push_into_drawer'].append((cond, {blk(c): 'drawer', 'grasped': 0}))
    return rules


TASK_RULES = _task_rules()
TASK_NAMES = tuple(TASK_RULES)  # calvin's ``list(tasks.keys())``

# One task per category in a chain (multistep_sequences.py ``task_categories``).
TASK_CATEGORIES = {
    **{t: 1 for t in TASK_NAMES if t.startswith(('rotate_', 'push_')) and t != 'push_into_drawer'},
    'move_slider_left': 2, 'move_slider_right': 2, 'open_drawer': 3, 'close_drawer': 3,
    **{f'lift_{c}_block_table': 4 for c in BLOCK_COLORS},
    **{f'lift_{c}_block_slider': 5 for c in BLOCK_COLORS},
    **{f'lift_{c}_block_drawer': 6 for c in BLOCK_COLORS},
    'place_in_slider': 7, 'place_in_drawer': 7,
    **{t: 8 for t in ('turn_on_lightbulb', 'turn_off_lightbulb', 'turn_on_led', 'turn_off_led')},
    'push_into_drawer': 9, 'stack_block': 10, 'unstack_block': 11,
}


# ------------------------------------------------------------------------------------------------------
# Symbolic world
# ------------------------------------------------------------------------------------------------------

def initial_conditions() -> list[dict]:
    """The 192 symbolic start states: 1-2 blocks on the table, at most one block per cabinet half."""
    out = []
    for values in itertools.product(*_INITIAL_VALUES.values()):
        blocks = values[4:7]
        n = blocks.count
        if n('table') in (1, 2) and n('slider_right') < 2 and n('slider_left') < 2:
            out.append(dict(zip(STATE_KEYS, values, strict=True)))
    return out


def _holds(state: dict, condition: dict) -> bool:
    return all(state[k] in v if isinstance(v, tuple) else state[k] == v for k, v in condition.items())


@functools.lru_cache(maxsize=None)
def _successors(state: tuple, task: int) -> tuple[tuple, ...]:
    """Next symbolic states (as value tuples) when ``TASK_NAMES[task]`` is done in ``state``."""
    d = dict(zip(STATE_KEYS, state, strict=True))
    out = []
    for condition, effect in TASK_RULES[TASK_NAMES[task]]:
        if _holds(d, condition):
            out.append(tuple({**d, **effect}[k] for k in STATE_KEYS))
    return tuple(out)


_CATEGORY_IDS = np.array([TASK_CATEGORIES[t] for t in TASK_NAMES])


def check_sequence(state: dict | tuple, tasks: Sequence[int | str]) -> bool:
    """calvin's ``check_sequence``: each task applies in exactly one way, all categories distinct."""
    s = tuple(state[k] for k in STATE_KEYS) if isinstance(state, dict) else state
    idx = [TASK_NAMES.index(t) if isinstance(t, str) else int(t) for t in tasks]
    for t in idx:
        nxt = _successors(s, t)
        if len(nxt) != 1:
            return False
        s = nxt[0]
    return len(set(_CATEGORY_IDS[idx].tolist())) == len(idx)


def _sequences_for_state(state: dict, count: int, seed: int) -> list[tuple[str, ...]]:
    """calvin's ``get_sequences_for_state2``: rejection-sample ``count`` valid chains.

    ``np.random.choice(34 names, 5, replace=False)`` on the legacy generator is ``permutation(34)[:5]``;
    drawing the permutation directly consumes the identical random stream.
    """
    rs = np.random.RandomState(seed)
    s = tuple(state[k] for k in STATE_KEYS)
    n = len(TASK_NAMES)
    out = []
    while len(out) < count:
        idx = rs.permutation(n)[:CHAIN_LENGTH].tolist()
        if check_sequence(s, idx):
            out.append(tuple(TASK_NAMES[i] for i in idx))
    return out


def generate_sequences(num_sequences: int = NUM_SEQUENCES) -> list[tuple[dict, tuple[str, ...]]]:
    """The chains ``[(initial_state, (task1..task5)), ...]``, exactly as calvin's ``get_sequences``."""
    states = initial_conditions()
    counts = [len(part) for part in np.array_split(np.arange(num_sequences), len(states))]
    results = []
    for i, (state, count) in enumerate(zip(states, counts, strict=True)):
        results += [(state, seq) for seq in _sequences_for_state(state, count, seed=i)]
    np.random.RandomState(0).shuffle(results)  # calvin shuffles the (state, chain) pairs under seed 0
    return results


def _default_cache_dir() -> Path:
    base = os.environ.get('XDG_CACHE_HOME') or str(Path.home() / '.cache')
    return Path(base) / 'dreamvla_jax'


def get_sequences(num_sequences: int = NUM_SEQUENCES, *, cache_dir: str | os.PathLike | None = None,
                  use_cache: bool = True) -> list[tuple[dict, tuple[str, ...]]]:
    """``generate_sequences`` with an on-disk cache (``cache_dir``, default ``~/.cache/dreamvla_jax``).

    A cache file that cannot be read is regenerated; a cache write failure only logs a warning.
    """
    if not use_cache:
        return generate_sequences(num_sequences)
    name = f'calvin_sequences_v{_CACHE_VERSION}_{num_sequences}.json'
    path = Path(cache_dir or _default_cache_dir()) / name
    if path.is_file():
        try:
            rows = json.loads(path.read_text())
            seqs = [(dict(zip(STATE_KEYS, state, strict=True)), tuple(tasks)) for state, tasks in rows]
            if len(seqs) == num_sequences:
                return seqs
        except (ValueError, TypeError):
            log.warning('ignoring the unreadable sequence cache %s', path)
    log.info('generating the %d CALVIN evaluation chains (once; cached in %s)', num_sequences, path)
    seqs = generate_sequences(num_sequences)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f'.tmp{os.getpid()}')
        tmp.write_text(json.dumps([[[s[k] for k in STATE_KEYS], list(t)] for s, t in seqs]))
        tmp.replace(path)
    except OSError as e:
        log.warning('could not cache the evaluation chains in %s: %s', path, e)
    return seqs


# ------------------------------------------------------------------------------------------------------
# Reset state
# ------------------------------------------------------------------------------------------------------

def fnv1_32(data: bytes | str, seed: int = 0) -> int:
    """pyhash's ``fnv1_32``: FNV-1 (multiply, then xor) 32-bit with initial value ``seed`` (0, NOT the FNV
    offset basis). A ``str`` is hashed as its UTF-16-LE bytes, as pyhash does on little-endian CPython 3."""
    if isinstance(data, str):
        data = data.encode('utf-16-le')
    h = seed & 0xFFFFFFFF
    for byte in data:
        h = ((h * 0x01000193) & 0xFFFFFFFF) ^ byte
    return h


def condition_seed(initial_condition: dict) -> int:
    """The seed calvin derives from a symbolic state: ``fnv1_32(str(state.values()))``."""
    return fnv1_32(str(initial_condition.values()))


# Fixed robot start (TCP (0.026, -0.231, 0.571), gripper open) and the block slots of scene D.
ROBOT_START = np.array([
    0.02586889, -0.2313129, 0.5712808, 3.09045411, -0.02908596, 1.50013585, 0.07999963, -1.21779124,
    1.03987629, 2.11978254, -2.34205014, -0.87015899, 1.64119093, 0.55344928, 1.0])
_SLIDER_LEFT_SLOT = np.array([-2.40851662e-01, 9.24044687e-02, 4.60990009e-01])
_SLIDER_RIGHT_SLOT = np.array([7.03416330e-02, 9.24044687e-02, 4.60990009e-01])
_TABLE_SLOTS = (np.array([5.00000896e-02, -1.20000177e-01, 4.59990009e-01]),
                np.array([2.29995412e-01, -1.19995140e-01, 4.59990010e-01]))
_BLOCK_YAW = (np.pi / 2 - np.pi / 8, np.pi / 2 + np.pi / 8)


def reset_state(initial_condition: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(robot_obs[15], scene_obs[24])`` of a symbolic state (``get_env_state_for_initial_condition``).

    The random parts (which table slot each block takes, block yaws) come from one legacy generator seeded
    by ``condition_seed``, drawn in calvin's order: the slot shuffle, then the red, blue and pink yaws.
    """
    rs = np.random.RandomState(condition_seed(initial_condition))
    table = list(_TABLE_SLOTS)
    rs.shuffle(table)
    c = initial_condition
    scene = np.zeros(24)
    scene[0] = 0.28 if c['slider'] == 'left' else 0.0
    scene[1] = 0.22 if c['drawer'] == 'open' else 0.0
    scene[3] = 0.088 if c['lightbulb'] == 1 else 0.0   # the switch position that keeps the bulb on
    scene[4] = c['lightbulb']
    scene[5] = c['led']
    slider = {'slider_right': _SLIDER_RIGHT_SLOT, 'slider_left': _SLIDER_LEFT_SLOT}
    # Red takes the first table slot; blue the second when red is on the table too, else the first;
    # pink the second (at most two blocks are on the table).
    blue_table = table[1] if c['red_block'] == 'table' else table[0]
    for offset, color, table_slot in ((6, 'red', table[0]), (12, 'blue', blue_table), (18, 'pink', table[1])):
        where = c[f'{color}_block']
        scene[offset:offset + 3] = slider.get(where, table_slot)
        scene[offset + 5] = rs.uniform(*_BLOCK_YAW)
    return ROBOT_START.copy(), scene


# ------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------

def count_success(results: Sequence[int], chain_length: int = CHAIN_LENGTH) -> list[float]:
    """Fraction of chains with >= k completed subtasks, k = 1..chain_length (calvin's ``count_success``)."""
    results = np.asarray(results)
    if results.size == 0:
        return [0.0] * chain_length
    return [float(np.mean(results >= k)) for k in range(1, chain_length + 1)]


def summarize(results: Sequence[int], chains: Iterable[Sequence[str]],
              chain_length: int = CHAIN_LENGTH) -> dict:
    """calvin's ``print_and_save`` numbers: ``avg_seq_len``, ``chain_sr`` {k: rate}, ``task_info``
    {task: {success, total}} (a task counts once per chain that reached it)."""
    success, total = Counter(), Counter()
    for n_done, chain in zip(results, chains, strict=True):
        for task in chain[:n_done]:
            success[task] += 1
            total[task] += 1
        if n_done < len(chain):
            total[chain[n_done]] += 1
    return {
        'num_sequences': len(results),
        'avg_seq_len': float(np.mean(results)) if len(results) else 0.0,
        'chain_sr': {k + 1: sr for k, sr in enumerate(count_success(results, chain_length))},
        'task_info': {t: {'success': success[t], 'total': total[t], 'success_rate': success[t] / total[t]}
                      for t in sorted(total)},
    }

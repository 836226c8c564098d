"""Token layout and block attention mask of DreamVLA, declared as named groups and rules.

Each timestep contributes context tokens (group A: text, state, image latents, CLS) followed by query
tokens (group B: dream queries of every enabled modality, then action queries). Who may attend to
whom is a small table over token *roles* (SPEC section 3), evaluated for every (query, key) pair from
the per-token role and timestep, so any layout (training: all timesteps with their queries; fast
inference: past queries dropped) gets its mask from the same rules.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CONTEXT, DREAM, ACTION = 'context', 'dream', 'action'


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    name: str
    size: int
    role: str  # CONTEXT | DREAM | ACTION


def _same_step(q_role: str, k_role: str) -> bool:
    """May a query of role ``q_role`` see a key of role ``k_role`` at the SAME timestep?"""
    if k_role == CONTEXT:
        return True                      # everyone reads the context of its own timestep
    if q_role == ACTION and k_role == DREAM:
        return True                      # actions read the dreams of their own timestep
    return False                         # queries are visible to nobody else, not even themselves


def _earlier_step(q_role: str, k_role: str) -> bool:
    """... a key of an EARLIER timestep? Only context; queries of other timesteps are hidden."""
    return k_role == CONTEXT


def timestep_groups(cfg) -> list[TokenGroup]:
    """The groups of one timestep, in sequence order, for ``config.model``."""
    n_lat = cfg.resampler.latents
    groups = [TokenGroup('text', 1, CONTEXT), TokenGroup('state', 1, CONTEXT)]
    for cam in cfg.cameras:
        groups.append(TokenGroup(f'latents_{cam}', n_lat, CONTEXT))
    for cam in cfg.cameras:
        groups.append(TokenGroup(f'cls_{cam}', 1, CONTEXT))
    for name in enabled_dreams(cfg):
        groups.append(TokenGroup(f'dream_{name}', cfg.dream[name].queries_per_camera * len(cfg.cameras),
                                 DREAM))
    groups.append(TokenGroup('action', cfg.action.chunk, ACTION))
    return groups


def enabled_dreams(cfg) -> list[str]:
    return [name for name in cfg.dream.order if cfg.dream[name].enabled]


def group_slices(groups: list[TokenGroup]) -> dict[str, slice]:
    """Offsets of each named group inside one timestep."""
    out, start = {}, 0
    for g in groups:
        out[g.name] = slice(start, start + g.size)
        start += g.size
    return out


def layout(groups: list[TokenGroup], steps: int, *, queries_at: tuple[int, ...] | None = None):
    """Per-token (role, timestep) arrays of a sequence of ``steps`` timesteps.

    ``queries_at`` lists the timesteps that keep their query tokens (default: all). Tokens appear
    timestep by timestep, context before queries.
    """
    keep = set(range(steps) if queries_at is None else queries_at)
    roles, times = [], []
    for t in range(steps):
        for g in groups:
            if g.role != CONTEXT and t not in keep:
                continue
            roles += [g.role] * g.size
            times += [t] * g.size
    return np.array(roles), np.array(times)


def attention_mask(roles: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Boolean ``[T, T]`` mask (True = query row may attend to key column)."""
    names = (CONTEXT, DREAM, ACTION)
    same = np.array([[_same_step(q, k) for k in names] for q in names])
    earlier = np.array([[_earlier_step(q, k) for k in names] for q in names])
    r = np.array([names.index(role) for role in roles])
    tq, tk = times[:, None], times[None, :]
    rule_same = same[r[:, None], r[None, :]]
    rule_earlier = earlier[r[:, None], r[None, :]]
    mask = np.where(tq == tk, rule_same, np.where(tk < tq, rule_earlier, False))
    assert mask.any(axis=1).all(), 'every token must see at least one key'
    return mask

"""AdamW with the preset's learning-rate schedule and global-norm clipping (SPEC section 9)."""

from __future__ import annotations

import optax


def make_schedule(config, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Per-step learning rate.

    official ('cosine'): linear warm-up from ``warmup_init * lr`` (0) over ``warmup_epochs`` epochs,
    then cosine decay to 0 at ``total_steps``. paper ('constant'): linear warm-up from
    ``warmup_init * lr`` (1e-2 lr), then constant.
    """
    tr = config.train
    warmup = int(round(tr.warmup_epochs * steps_per_epoch))
    init = tr.lr * tr.warmup_init
    if tr.schedule == 'cosine':
        return optax.warmup_cosine_decay_schedule(init_value=init, peak_value=tr.lr, warmup_steps=warmup,
                                                  decay_steps=max(total_steps, warmup + 1), end_value=0.0)
    if tr.schedule == 'constant':
        if warmup == 0:
            return optax.constant_schedule(tr.lr)
        return optax.join_schedules([optax.linear_schedule(init, tr.lr, warmup), optax.constant_schedule(tr.lr)],
                                    [warmup])
    raise ValueError(f"config.train.schedule: unknown schedule {tr.schedule!r}; use 'cosine' or 'constant'")


def make_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW; weight decay applies to every trained parameter (official)."""
    tr = config.train
    return optax.chain(
        optax.clip_by_global_norm(tr.clip),
        optax.adamw(schedule, b1=tr.b1, b2=tr.b2, eps=tr.eps, weight_decay=tr.weight_decay),
    )

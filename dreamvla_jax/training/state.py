"""Train state, abstract-first sharded init, and the pure train step.

The train state is a plain pytree ``{'step', 'params', 'opt_state', 'rng'}`` holding only the TRAINED
parameters (an ``nnx.State``); frozen encoders live in a separate ``frozen`` state that is never
differentiated and has no optimizer moments. ``rng`` is raw ``uint32`` key data (checkpointable); each
step folds in the step number, so a resumed run draws the same randomness.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dreamvla_jax import sharding as shd
from dreamvla_jax.data import preprocess
from dreamvla_jax.models import dreamvla, layers
from dreamvla_jax.training import optimizer


@dataclasses.dataclass
class Trainer:
    """Everything the loop needs: compiled step, shardings, the initial (or restored) state."""
    config: Any
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_shardings: Any
    frozen_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    step_fn: Callable  # jitted (state, frozen, batch) -> (state, metrics); state donated


def init_state(config, tx: optax.GradientTransformation):
    """``(train_state, frozen)`` from the config's seed (call under ``jax.jit`` or ``eval_shape``)."""
    model = dreamvla.DreamVLA(config, rngs=nnx.Rngs(config.seed))
    _, params, frozen = nnx.split(model, dreamvla.trainable_filter(config), ...)
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'rng': jax.random.key_data(jax.random.key(config.seed))}
    return state, frozen


def train_step(config, graphdef, tx, schedule, state, frozen, batch):
    """One optimizer step. Pure: same (state, frozen, batch) -> same result, bit for bit."""
    with layers.unrolled_layers(config.model.get('unroll_layers', False)):
        return _train_step(config, graphdef, tx, schedule, state, frozen, batch)


def _train_step(config, graphdef, tx, schedule, state, frozen, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    r_aug, r_model = jax.random.split(rng)

    def loss_fn(params):
        model = nnx.merge(graphdef, params, frozen)
        with jax.named_scope('preprocess'):
            inputs = preprocess.preprocess(batch, config, r_aug)
        return model.compute_loss(inputs, r_model)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    with jax.named_scope('optimizer'):
        updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params),
                   update_norm=optax.global_norm(updates), lr=schedule(state['step']))
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state, 'rng': state['rng']}
    return new, metrics


def make_trainer(config, mesh, *, steps_per_epoch: int, total_steps: int, donate: bool = True) -> Trainer:
    """Builds shardings from the abstract state and jits the train step with explicit shardings."""
    schedule = optimizer.make_schedule(config, steps_per_epoch, total_steps)
    tx = optimizer.make_optimizer(config, schedule)
    graphdef = nnx.split(dreamvla.abstract_model(config), dreamvla.trainable_filter(config), ...)[0]
    abstract_state, abstract_frozen = jax.eval_shape(lambda: init_state(config, tx))
    state_sh = shd.tree_shardings(abstract_state, mesh, config)
    frozen_sh = shd.tree_shardings(abstract_frozen, mesh, config)
    batch_sh = shd.batch_sharding(mesh)
    step = jax.jit(lambda s, f, b: train_step(config, graphdef, tx, schedule, s, f, b),
                   in_shardings=(state_sh, frozen_sh, batch_sh),
                   out_shardings=(state_sh, shd.NamedSharding(mesh, shd.P())),
                   donate_argnums=(0,) if donate else ())
    return Trainer(config, mesh, graphdef, tx, schedule, state_sh, frozen_sh, batch_sh, step)


def create_state(trainer: Trainer):
    """The initial ``(state, frozen)``, created directly in its shardings by one jitted init."""
    config = trainer.config
    return jax.jit(lambda: init_state(config, trainer.tx),
                   out_shardings=(trainer.state_shardings, trainer.frozen_shardings))()


def model_from(trainer: Trainer, state, frozen) -> dreamvla.DreamVLA:
    """The NNX model holding the current weights (for evaluation and export)."""
    return nnx.merge(trainer.graphdef, state['params'], frozen)

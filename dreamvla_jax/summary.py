"""Parameter summary of a config, built abstractly (no weights allocated).

  python -m dreamvla_jax.summary --config configs/calvin.py[:preset] [--json]

``--json`` prints ``{"modules": {name: {"params": int, "trainable": bool}}, "total": int,
"trainable": int}`` (a public interface).
"""

from __future__ import annotations

import json

import jax
from absl import flags
from flax import nnx
from ml_collections import config_flags

from dreamvla_jax import cli
from dreamvla_jax.models import dreamvla

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/calvin.py', 'Config file[:preset].')
_JSON = flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')


def count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def summarize(config) -> dict:
    """``{"modules": {name: {"params", "trainable"}}, "total", "trainable"}`` for ``config``."""
    model = dreamvla.abstract_model(config)
    frozen = set(config.model.freeze)
    modules = {}
    for name in dreamvla.MODULES:
        if not hasattr(model, name):
            continue  # disabled dream head
        part = getattr(model, name)
        modules[name] = {'params': count(part if isinstance(part, nnx.Variable) else nnx.state(part, nnx.Param)),
                         'trainable': name not in frozen}
    total = count(nnx.state(model, nnx.Param))
    trainable = count(nnx.state(model, dreamvla.trainable_filter(config)))
    assert total == sum(m['params'] for m in modules.values()), 'a top-level module is missing from MODULES'
    return {'modules': modules, 'total': total, 'trainable': trainable}


def main(argv):
    del argv
    s = summarize(_CONFIG.value)
    if _JSON.value:
        print(json.dumps(s, indent=2))
        return
    print(f"{'module':<20} {'params':>15}  trainable")
    for name, m in s['modules'].items():
        print(f"{name:<20} {m['params']:>15,}  {'yes' if m['trainable'] else 'no (frozen)'}")
    print(f"{'total':<20} {s['total']:>15,}")
    print(f"{'trainable':<20} {s['trainable']:>15,}")
    print(f"{'frozen':<20} {s['total'] - s['trainable']:>15,}")


if __name__ == '__main__':
    cli.run(main)

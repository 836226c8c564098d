"""The pretrained-weights checkpoint written by ``convert_weights`` and read by ``train``.

Layout (an Orbax composite checkpoint, versioned):
  ``params``:   ``{'text_encoder': {...}, 'vision_encoder': {...}, 'backbone': {...}}`` (only the parts
                converted), float32 arrays shaped like ``nnx.state(module, nnx.Param).to_pure_dict()`` of
                ``CLIPText``, ``MAEViT`` and ``GPT2Blocks`` (stacked layers on a leading axis);
  ``metadata``: JSON ``{'format_version', 'parts': {part: {'source', 'model_type', 'architectures',
                'tensors_used', 'tensors_skipped'}}}``.

``merge_into`` places those parts into the full model's parameter tree with shape checks and a cast to
the target dtype (bf16 for the frozen vision encoder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dreamvla_jax.convert.common import ConvertError, flatten, unflatten

FORMAT_VERSION = 1
PARTS = ('text_encoder', 'vision_encoder', 'backbone')


def _checkpointer():
    import orbax.checkpoint as ocp

    # Handlers named per item so restore and metadata work without the caller passing a registry.
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(params=ocp.StandardCheckpointHandler(),
                                                           metadata=ocp.JsonCheckpointHandler()))


def save_pretrained(out: str | Path, params: dict[str, dict], metadata: dict[str, Any]) -> Path:
    """Writes ``params`` (nested dicts of numpy arrays keyed by part) and ``metadata`` to ``out``."""
    import orbax.checkpoint as ocp

    unknown = set(params) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown pretrained parts {sorted(unknown)}; expected a subset of {PARTS}")
    out = Path(out).absolute()
    meta = {'format_version': FORMAT_VERSION, **metadata}
    ckpt = _checkpointer()
    ckpt.save(out, ocp.args.Composite(params=ocp.args.StandardSave(params), metadata=ocp.args.JsonSave(meta)),
              force=True)
    return out


def load_metadata(path: str | Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    path = _existing(path)
    meta = _checkpointer().restore(path, ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata
    if 'kind' in meta:  # written by convert_weights --dreamvla/--seer (convert.official)
        raise ConvertError(f"{path} is a converted official {meta['kind']} checkpoint: load it with "
                           "--config.init.official (or eval --checkpoint), not --config.init.pretrained.")
    if meta.get('format_version') != FORMAT_VERSION:
        raise ConvertError(f"{path} has pretrained format version {meta.get('format_version')!r}; this code "
                           f"reads version {FORMAT_VERSION}: re-run convert_weights.")
    return meta


def load_pretrained(path: str | Path) -> dict[str, dict]:
    """Reads the ``params`` item as host numpy arrays: ``{part: nested dict}``."""
    import jax
    import orbax.checkpoint as ocp

    path = _existing(path)
    load_metadata(path)  # fails clearly on a foreign or outdated layout
    params = _checkpointer().restore(path, ocp.args.Composite(params=ocp.args.StandardRestore())).params
    # Host numpy: the caller decides placement and sharding (merge_into).
    return jax.tree.map(np.asarray, params)


def merge_into(model_state: dict, pretrained: dict[str, dict]) -> dict:
    """Returns a copy of ``model_state`` (a pure dict of the full model's Params: arrays or
    ``jax.ShapeDtypeStruct``) with every pretrained part replaced.

    Each pretrained part must cover its module exactly (no partial loads): a missing or unexpected
    parameter, or a shape mismatch, raises ``ConvertError`` naming the key. Values are cast to the target
    dtype and, when the target leaf carries a sharding, placed with it.
    """
    import jax

    out = dict(model_state)
    for part, tree in pretrained.items():
        if part not in model_state:
            raise ConvertError(f"the pretrained checkpoint has part {part!r}, which the model does not have "
                               f"(model parts: {sorted(model_state)}).")
        target = flatten(model_state[part])
        source = flatten(tree)
        missing = sorted(set(target) - set(source))
        extra = sorted(set(source) - set(target))
        if missing or extra:
            raise ConvertError(f"pretrained {part} does not match the model: missing {missing[:5]}, "
                               f"unexpected {extra[:5]} (was it converted for another config?).")
        merged = {}
        for key, leaf in target.items():
            value = np.asarray(source[key])
            if tuple(value.shape) != tuple(leaf.shape):
                raise ConvertError(f"pretrained {part} '{key}' has shape {list(value.shape)} but the model "
                                   f"expects {list(leaf.shape)}.")
            value = value.astype(leaf.dtype)
            sharding = getattr(leaf, 'sharding', None)
            merged[key] = jax.device_put(value, sharding) if sharding is not None else value
        out[part] = unflatten(merged)
    return out


def _existing(path: str | Path) -> Path:
    path = Path(path).absolute()
    if not path.is_dir():
        raise ConvertError(f"pretrained checkpoint {path} does not exist.")
    return path

"""The conversion engine shared by the per-source mapping tables (``clip``, ``mae``, ``gpt2``).

A source module declares, as data:
  * ``RULES``: ``Rule(target, sources, fn)`` rows, read as "target <- fn(*sources)". ``target`` is a dotted
    path in our module's ``nnx.state(module, nnx.Param).to_pure_dict()``; a source containing ``{i}``
    is a per-layer tensor, converted for every layer and stacked on a leading axis (``layers.Stack``).
    ``target=None`` consumes a source by checking it (e.g. a fixed table we recompute) instead of storing it.
  * ``SKIP``: ``(regex, reason)`` rows for source tensors we deliberately do not use (the other tower of
    CLIPModel, GPT-2's token tables, ...). They are reported, never silently dropped.
  * ``PREFIXES``: the prefixes a saved model may put in front of the names (``transformer.``, ``vit.``).

``apply_rules`` then enforces the contract of issue 4: every source tensor is used exactly once (or
skipped by a named rule), every target parameter is filled exactly once, and any shape mismatch names the
source key and both shapes. All failures are ``ConvertError`` with one readable sentence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np


class ConvertError(ValueError):
    """A conversion failure the user can act on (the CLI prints it and exits 2)."""


# ----------------------------------------------------------------------------------------------------------
# Transforms used by the tables. Each takes the source arrays (in the order listed) and returns one array.


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear.weight [out, in]`` -> our kernel ``[in, out]``."""
    return w.T


def fused_qkv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three ``nn.Linear`` weights ``[W, W]`` ([out, in]) -> our fused ``[W, 3W]`` kernel ``[q | k | v]``."""
    return np.concatenate([q.T, k.T, v.T], axis=1)


def fused_qkv_bias(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Three biases ``[W]`` -> ``[3W]`` in ``[q | k | v]`` order."""
    return np.concatenate([q, k, v], axis=0)


def conv_patch_kernel(w: np.ndarray) -> np.ndarray:
    """Patch conv ``[out, C, p, p]`` -> linear kernel ``[p*p*C, out]`` over (row, col, channel)-flattened
    patches (``models.mae_vit.patchify``)."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


@dataclasses.dataclass(frozen=True)
class Rule:
    target: str | None          # dotted path in our pure param dict; None: the sources are only checked
    sources: tuple[str, ...]    # source tensor names after the prefix; '{i}' marks a per-layer tensor
    fn: Callable[..., Any] = identity
    layers: int | None = None   # per-layer count when it differs from the table's (whole-model tables)

    @property
    def per_layer(self) -> bool:
        return any('{i}' in s for s in self.sources)


def rule(target: str | None, sources: str | Iterable[str], fn: Callable[..., Any] = identity, *,
         layers: int | None = None) -> Rule:
    return Rule(target, (sources,) if isinstance(sources, str) else tuple(sources), fn, layers)


# ----------------------------------------------------------------------------------------------------------
# Nested dicts <-> dotted paths.


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f'{prefix}{k}'
        if isinstance(v, dict):
            out.update(flatten(v, key + '.'))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        *parents, leaf = path.split('.')
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# Reading HF save_pretrained folders.


@dataclasses.dataclass
class SourceFolder:
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]  # float arrays as stored (fp16/bf16 are widened to fp32)
    files: list[Path]


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / 'config.json').read_text())


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ConvertError(f"{path} is truncated or not a valid safetensors file ({e}).") from None
    except (TypeError, ValueError):
        # numpy has no bfloat16: only such files need torch.
        try:
            from safetensors.torch import load_file as load_torch
        except ImportError:
            raise ConvertError(f"{path} holds bfloat16 tensors, which need torch to read; install torch "
                               "or re-save the model in float32.") from None
        return {k: v.float().numpy() for k, v in load_torch(str(path)).items()}


def _read_torch(path: Path, weights_only: bool = True) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConvertError(f"{path} is a PyTorch pickle; reading it needs torch (safetensors files do "
                           "not).") from None
    try:
        # mmap: a training checkpoint also holds optimizer state we never read into memory.
        sd = torch.load(str(path), map_location='cpu', weights_only=weights_only, mmap=True)
    except RuntimeError as e:
        if 'mmap' not in str(e):
            raise ConvertError(f"{path} could not be read by torch.load ({type(e).__name__}: {e}).") from None
        sd = _read_torch_no_mmap(torch, path, weights_only)  # legacy (pre-zip) torch.save format
    except Exception as e:  # torch raises a zoo of types for truncated or foreign files
        raise ConvertError(f"{path} could not be read by torch.load ({type(e).__name__}: {e}).") from None
    # Original MAE / timm checkpoints wrap the state dict in 'model'; Seer / DreamVLA training
    # checkpoints in 'model_state_dict' (next to the optimizer state).
    for key in ('model', 'model_state_dict', 'state_dict'):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict):
        raise ConvertError(f"{path} does not hold a state dict (found {type(sd).__name__}).")
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def _read_torch_no_mmap(torch, path: Path, weights_only: bool):
    try:
        return torch.load(str(path), map_location='cpu', weights_only=weights_only)
    except Exception as e:
        raise ConvertError(f"{path} could not be read by torch.load ({type(e).__name__}: {e}).") from None


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    return _read_safetensors(path) if path.suffix == '.safetensors' else _read_torch(path)


def _widen(x: np.ndarray) -> np.ndarray:
    # OpenAI CLIP ships fp16 weights; convert in fp32 so every transform is exact.
    return x.astype(np.float32) if x.dtype in (np.float16,) else x


def read_folder(folder: str | Path, flag: str,
                check: Callable[[SourceFolder], None] | None = None) -> SourceFolder:
    """Reads ``config.json`` and the weights of a ``save_pretrained`` folder (single file or sharded).

    ``check(src)`` runs on the config before any weights are read, so a wrong folder fails fast."""
    path = Path(folder)
    if not path.is_dir():
        raise ConvertError(f"--{flag}: folder {path} does not exist.")
    cfg_file = path / 'config.json'
    if not cfg_file.is_file():
        raise ConvertError(f"--{flag}: {path} has no config.json; pass a folder written by save_pretrained.")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConvertError(f"{cfg_file} is not valid JSON ({e}).") from None
    if check is not None:
        check(SourceFolder(path, config, {}, []))
    files: list[Path] = []
    for index_name in ('model.safetensors.index.json', 'pytorch_model.bin.index.json'):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get('weight_map', {})
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise ConvertError(f"{index} lists shard {missing[0]}, which does not exist.")
            break
    else:
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if (path / name).is_file():
                files = [path / name]
                break
        else:
            files = sorted(path.glob('*.pth'))[:1]
    if not files:
        raise ConvertError(f"--{flag}: {path} holds no weights (model.safetensors, pytorch_model.bin, "
                           "a sharded index or a .pth file).")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in _read_weights(f).items():
            tensors[k] = _widen(v)
    return SourceFolder(path, config, tensors, files)


# ----------------------------------------------------------------------------------------------------------
# Config checks.


def check_fields(folder: Path, checks: Iterable[tuple[str, Any, str, Any]]) -> None:
    """``checks``: ``(hf field, hf value, our config field, our value)``; the first mismatch fails."""
    for hf_field, hf_value, our_field, our_value in checks:
        if isinstance(our_value, float) and isinstance(hf_value, (int, float)):
            ok = math.isclose(hf_value, our_value, rel_tol=1e-9)
        else:
            ok = hf_value == our_value
        if not ok:
            raise ConvertError(f"{folder}/config.json has {hf_field} = {hf_value!r} but the target config "
                               f"has {our_field} = {our_value!r}: this folder does not fit the chosen model "
                               "config.")


def check_model_type(src: SourceFolder, flag: str, allowed: tuple[str, ...], what: str) -> str:
    model_type = src.config.get('model_type')
    if model_type not in allowed:
        raise ConvertError(f"--{flag}: {src.path}/config.json has model_type {model_type!r}, but --{flag} "
                           f"expects {what} (model_type {' or '.join(repr(a) for a in allowed)}).")
    return model_type


# ----------------------------------------------------------------------------------------------------------
# Applying a table.


@dataclasses.dataclass
class Converted:
    params: dict                 # nested dict of float32 numpy arrays, same tree as the module's Params
    used: list[str]              # source names consumed by rules (original names, with prefix)
    skipped: list[str]           # source names skipped by a SKIP row


def strip_prefix(names: Iterable[str], prefixes: tuple[str, ...], anchor: str,
                 where: str = 'the state dict') -> tuple[str, dict[str, str]]:
    """Picks the prefix under which ``anchor`` exists; returns it and ``{stripped name: original}``.

    Names without the prefix keep their full name (CLIPModel's ``text_projection`` sits outside
    ``text_model.``)."""
    names = list(names)
    present = set(names)
    prefix = next((p for p in prefixes if p + anchor in present), None)
    if prefix is None:
        tried = ', '.join(repr(p + anchor) for p in prefixes)
        raise ConvertError(f"{where} has no tensor named {tried}: it is not the expected model's state dict.")
    out = {}
    for n in names:
        out[n[len(prefix):] if n.startswith(prefix) else n] = n
    return prefix, out


def apply_rules(src: SourceFolder, part: str, rules: list[Rule], skip: list[tuple[str, str]],
                prefixes: tuple[str, ...], anchor: str, num_layers: int, targets: dict[str, tuple],
                progress: bool = False) -> Converted:
    """Runs a mapping table over ``src`` and checks the result against ``targets`` (path -> shape)."""
    from tqdm import tqdm

    target_names = [r.target for r in rules if r.target is not None]
    dup = {t for t in target_names if target_names.count(t) > 1}
    if dup:  # a table bug, not a user error
        raise AssertionError(f"mapping table for {part} fills {sorted(dup)} twice")
    prefix, names = strip_prefix(src.tensors, prefixes, anchor, where=str(src.path))
    used: dict[str, str] = {}  # original source name -> target it went to
    missing: list[str] = []
    flat: dict[str, np.ndarray] = {}

    def take(name: str, target: str) -> np.ndarray | None:
        if name not in names:
            missing.append(prefix + name)
            return None
        original = names[name]
        if original in used:
            raise AssertionError(f"mapping table for {part} uses {original} twice")
        used[original] = target or '(checked)'
        return src.tensors[original]

    for r in tqdm(rules, desc=f'{part}', unit='rule', disable=not progress, leave=False):
        expected = targets.get(r.target) if r.target is not None else None
        if r.target is not None and expected is None:
            raise AssertionError(f"mapping table for {part} names {r.target}, which the module does not have")
        per_layer = []
        for i in range(num_layers if r.layers is None else r.layers) if r.per_layer else [None]:
            srcs = [s.format(i=i) for s in r.sources]
            arrays = [take(s, r.target) for s in srcs]
            if any(a is None for a in arrays):
                continue
            want = expected[1:] if (r.per_layer and expected is not None) else expected
            try:
                out = r.fn(*arrays)
            except ConvertError:
                raise
            except ValueError:
                out = None
            if r.target is None:
                continue
            if out is None or tuple(out.shape) != tuple(want):
                shapes = ', '.join(f"'{names[s]}' {list(a.shape)}" for s, a in zip(srcs, arrays, strict=True))
                raise ConvertError(f"{src.path}: shape mismatch: {shapes} cannot fill {part} '{r.target}' "
                                   f"{list(want)} (via {r.fn.__name__}).")
            per_layer.append(np.asarray(out, np.float32))
        if r.target is not None and per_layer:
            flat[r.target] = np.stack(per_layer) if r.per_layer else per_layer[0]
    if missing:
        raise ConvertError(f"{src.path}: {len(missing)} tensor(s) needed for {part} are missing from "
                           f"{', '.join(f.name for f in src.files)}: {', '.join(missing[:8])}"
                           f"{' ...' if len(missing) > 8 else ''}.")
    skipped, unused = [], []
    stripped_of = {v: k for k, v in names.items()}
    for original in src.tensors:
        if original in used:
            continue
        stripped = stripped_of[original]
        if any(re.fullmatch(pattern, stripped) for pattern, _ in skip):
            skipped.append(original)
        else:
            unused.append(original)
    if unused:
        raise ConvertError(f"{src.path}: {len(unused)} tensor(s) have no place in {part} "
                           f"(a deeper or different model?): {', '.join(sorted(unused)[:8])}"
                           f"{' ...' if len(unused) > 8 else ''}.")
    unfilled = sorted(set(targets) - set(flat))
    if unfilled:
        raise ConvertError(f"{src.path}: {part} parameters left unfilled: {', '.join(unfilled)}.")
    return Converted(unflatten(flat), sorted(used), sorted(skipped))


def reference_libs():
    """``(torch, transformers)`` for ``--verify``, quietened (no load reports or progress bars)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConvertError(f"--verify needs torch and transformers ({e}).") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def abstract_param_shapes(build: Callable[[], Any]) -> dict[str, tuple]:
    """``{dotted path: shape}`` of a module's Params, built abstractly (no memory, no compute)."""
    from flax import nnx

    pure = nnx.state(nnx.eval_shape(build), nnx.Param).to_pure_dict()
    return {k: tuple(v.shape) for k, v in flatten(pure).items()}


def with_params(build: Callable[[], Any], params: dict):
    """Builds a module abstractly and fills its Params from a pure dict (used by ``--verify``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)

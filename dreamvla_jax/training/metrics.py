"""Metrics: one JSON object per logged step in ``metrics.jsonl`` (full-precision floats), TensorBoard
scalars, matmul FLOPs of the step's jaxpr and MFU against a per-device peak table."""

from __future__ import annotations

import json
import math
from pathlib import Path

# Dense bf16 peak FLOP/s per device, by substrings of ``device.device_kind``.
PEAK_FLOPS = {
    'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L4': 121e12,
    'TPU v6': 918e12, 'TPU v5p': 459e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v4': 275e12,
}


def peak_flops(device) -> float | None:
    kind = getattr(device, 'device_kind', '')
    for key, value in PEAK_FLOPS.items():
        if key.lower() in kind.lower():
            return value
    return None


def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function (XLA cost analysis; per device for SPMD programs)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get('flops')
    return float(flops) if flops else None


def _sub_jaxprs(params: dict):
    for value in params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, 'eqns'):
                yield v
            elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
                yield v.jaxpr


def matmul_flops(jaxpr) -> float:
    """Matrix-multiply FLOPs (2 per multiply-add of every ``dot_general`` and convolution) of a jaxpr, a
    ``scan`` body counted once per iteration and the costliest branch of a ``cond``; global over devices.

    This is the usual numerator of MFU: backend-independent, and complete where XLA's cost analysis is not (it
    counts a scanned layer stack's body once, and nothing inside a cuDNN attention call). A step traced with
    remat includes its recomputation (the benchmark traces without it; training's logged ``mfu`` does not).
    """
    return sum(flops for _, flops in matmul_terms(jaxpr))


def matmul_terms(jaxpr, scope: str = '') -> list[tuple[str, float]]:
    """``[(name stack, FLOPs)]`` of every matmul of ``matmul_flops``, each with its full ``jax.named_scope``
    path (e.g. ``transpose(jvp(backbone))/...``; sub-jaxprs inherit the path of the equation that holds them),
    so that FLOPs can be grouped by module (``training.profile.scope_of``)."""
    jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
    out = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        stack = str(eqn.source_info.name_stack)
        path = '/'.join(p for p in (scope, stack) if p)
        if name == 'dot_general':
            (lhs_contract, _), _ = eqn.params['dimension_numbers']
            lhs = eqn.invars[0].aval.shape
            out.append((path, 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)))
        elif name == 'conv_general_dilated':
            rhs = eqn.invars[1].aval.shape  # kernel: out features x in features/groups x spatial (OI...)
            spec = eqn.params['dimension_numbers']
            out_feature_dim = spec.rhs_spec[0] if spec is not None else 0
            per_output = math.prod(rhs) // rhs[out_feature_dim]
            out.append((path, 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output))
        subs = [matmul_terms(j, path) for j in _sub_jaxprs(eqn.params)]
        if not subs:
            continue
        if name == 'cond':
            out += max(subs, key=lambda terms: sum(f for _, f in terms))
        elif name == 'scan':
            out += [(p, eqn.params['length'] * f) for terms in subs for p, f in terms]
        else:
            out += [t for terms in subs for t in terms]
    return out


def mfu(flops_per_device: float | None, step_time: float, devices) -> float | None:
    """Model FLOPs utilisation of one device (None where the peak is unknown, e.g. CPU)."""
    peak = peak_flops(devices[0]) if devices else None
    if not flops_per_device or not peak or step_time <= 0:
        return None
    return flops_per_device / step_time / peak


class MetricsLogger:
    def __init__(self, workdir: str | Path, *, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / 'metrics.jsonl'
        self.tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / 'tb'))
            except ImportError:  # TensorBoard is optional; the JSONL file is the record
                self.tb = None

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), **{k: v for k, v in values.items() if v is not None}}
        with self.path.open('a') as f:
            f.write(json.dumps(record) + '\n')
        if self.tb is not None:
            for k, v in record.items():
                if k != 'step':
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / 'metrics.jsonl'
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

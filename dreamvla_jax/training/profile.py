"""Where a compiled step's device time goes: a profiler trace grouped by model module.

The model opens a ``jax.named_scope`` per module (``text_encoder``, ``vision_encoder``, ``resampler``,
``backbone``, ``decoder_<name>``, ``action_head``) and the train step one for ``preprocess`` and
``optimizer``. XLA keeps that name stack in each HLO instruction's ``op_name`` metadata (``jvp(backbone)``
forward, ``transpose(jvp(backbone))`` backward), and the profiler names each device op after its HLO
instruction, so joining the two gives milliseconds per module and direction without any other tool.

  python -m dreamvla_jax.benchmark train --config configs/calvin.py --batch 8 --compare bf16 --profile runs/prof
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

SCOPES = ('preprocess', 'text_encoder', 'vision_encoder', 'resampler', 'backbone', 'decoder_rgb',
          'decoder_depth', 'decoder_sam', 'decoder_dino', 'action_head', 'optimizer')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name="([^"]*)"', re.M)
_WRAP = re.compile(r'^(?:\w+\()+|\)+$')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """``{instruction name: op_name metadata}`` of a compiled module's text (``compiled.as_text()``)."""
    return {m.group(1): m.group(2) for m in _INSTR.finditer(hlo_text)}


def scope_of(op_name: str) -> str:
    """``'backbone/fwd'``, ``'backbone/bwd'``, ``'optimizer'`` ... or ``'other'`` for an ``op_name``: the
    outermost path segment naming a scope of ``SCOPES``; ``/bwd`` when it sits under a ``transpose(...)``."""
    for seg in op_name.split('/'):
        name = _WRAP.sub('', seg)
        if name in SCOPES:
            if name == 'optimizer':
                return name
            return f"{name}/{'bwd' if 'transpose(' in seg else 'fwd'}"
    return 'other'


def load_trace(logdir: str) -> dict:
    """The newest ``perfetto_trace.json.gz`` that ``jax.profiler.trace(logdir, create_perfetto_trace=True)``
    wrote."""
    paths = sorted(glob.glob(os.path.join(logdir, '**', 'perfetto_trace.json.gz'), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {logdir}")
    with gzip.open(paths[-1], 'rt') as f:
        return json.load(f)


def device_ops(trace: dict) -> tuple[list[tuple[str, str, float]], dict]:
    """``([(hlo op, op name, microseconds)], info)`` of the device ops in a Chrome/Perfetto trace.

    Device processes are the ones not named ``/host:...``. When a device has an ``XLA Ops`` line (one event
    per HLO op), only that line is read; otherwise every kernel event counts, named by its ``hlo_op``
    argument when it has one (the profiler's GPU kernels carry ``hlo_op`` and, for most, the op's name stack
    as ``name``). ``info`` lists the lines read and how many events each gave.
    """
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get('ph') == 'M' and e.get('name') == 'process_name':
            procs[e['pid']] = e.get('args', {}).get('name', '')
        elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
            threads[e['pid'], e['tid']] = e.get('args', {}).get('name', '')
    device = {pid for pid, name in procs.items() if name and not name.startswith('/host')}
    xla_ops = {key for key, name in threads.items() if key[0] in device and name == 'XLA Ops'}
    ops, lines = [], collections.Counter()
    for e in events:
        if e.get('ph') != 'X' or e.get('pid') not in device:
            continue
        key = (e['pid'], e.get('tid'))
        if xla_ops and key not in xla_ops:
            continue
        args = e.get('args') or {}
        ops.append((str(args.get('hlo_op') or e.get('name', '')), str(args.get('name', '')),
                    float(e.get('dur', 0.0))))
        lines[f"{procs[e['pid']]} / {threads.get(key, key[1])}"] += 1
    return ops, {'lines': dict(lines), 'xla_ops_line': bool(xla_ops)}


def summarize(trace: dict, hlo_text: str, steps: int, flops=(), top: int = 25) -> dict:
    """Milliseconds per step by scope (and the ``top`` costliest HLO ops) of ``steps`` traced steps.

    Each op's scope comes from its HLO instruction's ``op_name`` in ``hlo_text``, else from the event's own
    name stack. ``flops``: ``[(name stack, FLOPs per step)]`` (``metrics.matmul_terms``) adds the matmul
    TFLOP/s each scope achieves.
    """
    names = hlo_op_names(hlo_text)
    ops, info = device_ops(trace)
    by_scope, by_op, unmapped = collections.Counter(), collections.Counter(), 0
    for op, event_name, us in ops:
        op_name = names.get(op) or event_name
        scope = scope_of(op_name)
        unmapped += not op_name
        by_scope[scope] += us
        by_op[op, scope, op_name] += us
    ms = 1e-3 / max(steps, 1)
    scope_flops = collections.Counter()
    for path, f in flops:
        scope_flops[scope_of(path)] += f
    return {
        'steps': steps,
        'device_ms_per_step': sum(by_scope.values()) * ms,
        'by_scope_ms': {k: v * ms for k, v in by_scope.most_common()},
        'by_scope_tflop_per_s': {k: scope_flops[k] / (v * ms * 1e-3) / 1e12
                                 for k, v in by_scope.items() if scope_flops[k] and v},
        'top_ops': [{'op': op, 'ms': us * ms, 'scope': scope, 'op_name': op_name[-160:]}
                    for (op, scope, op_name), us in by_op.most_common(top)],
        'unscoped_ops': unmapped,
        'events': len(ops), **info,
    }


def profile_step(step_fn, steps: int, logdir: str, hlo_text: str, flops=(), calls: int | None = None) -> dict:
    """Runs ``step_fn()`` ``calls`` times (default ``steps``; one call may run several steps) under the profiler
    and summarises the ``steps`` steps it ran. ``logdir`` keeps the trace, the compiled HLO text (``hlo.txt.gz``,
    to map more ops by hand) and the summary (``profile.json``)."""
    import jax

    os.makedirs(logdir, exist_ok=True)
    with gzip.open(os.path.join(logdir, 'hlo.txt.gz'), 'wt') as f:
        f.write(hlo_text)
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        for _ in range(steps if calls is None else calls):
            step_fn()
    out = summarize(load_trace(logdir), hlo_text, steps, flops)
    with open(os.path.join(logdir, 'profile.json'), 'w') as f:
        json.dump(out, f, indent=1)
    return out

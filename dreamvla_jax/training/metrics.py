"""Metrics: one JSON object per logged step in ``metrics.jsonl`` (full-precision floats), TensorBoard
scalars, FLOPs from the compiled step and MFU against a per-device peak table."""

from __future__ import annotations

import json
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

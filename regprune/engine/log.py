"""Metrics sinks for training: JSON-lines file, optional TensorBoard, progress bar and epoch lines."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text

__all__ = ["MetricsLogger", "Progress", "to_jsonable", "read_metrics", "fmt_value", "epoch_line", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


def to_jsonable(value: Any) -> Any:
    """Convert tensors, numpy scalars and tuples into plain JSON-able python values."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, int, str, type(None))):
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return to_jsonable(value.item())
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (a missing file gives an empty list)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a crash; the rest is still useful
    return out


def _dumps(record: dict) -> str:
    # strict JSON has no NaN/Infinity; a diverged loss is spelled as a string so any reader can parse the file
    clean = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean)


class MetricsLogger:
    """Appends records to `run_dir/metrics.jsonl` and TensorBoard; does nothing when disabled (non-main ranks)."""

    def __init__(self, run_dir: Path | None, enabled: bool = True) -> None:
        self.enabled = bool(enabled and run_dir is not None)
        self.path = Path(run_dir) / METRICS_FILE if run_dir is not None else None
        self._file = None
        self._tb = None
        self._tb_tried = False
        self._run_dir = Path(run_dir) if run_dir is not None else None

    def _open(self) -> None:
        if self._file is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def _tensorboard(self):
        if not self._tb_tried:
            self._tb_tried = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tb = None
            else:
                assert self._run_dir is not None
                self._tb = SummaryWriter(log_dir=str(self._run_dir / "tensorboard"))
        return self._tb

    def write(self, record: dict) -> None:
        """Append one record (already JSON-able) to the sinks."""
        if not self.enabled:
            return
        self._open()
        self._file.write(_dumps(record) + "\n")
        self._file.flush()
        tb = self._tensorboard()
        if tb is not None:
            phase = record.get("phase", "train")
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    tb.add_scalar(f"{phase}/{key}", value, step)

    def drop_after(self, phase: str, step: int) -> None:
        """Remove `phase` records with a step past `step` (on resume they describe work being redone)."""
        if not self.enabled or self.path is None or not self.path.is_file():
            return
        self.close()
        records = read_metrics(self.path)
        kept = [r for r in records if not (r.get("phase") == phase and int(r.get("step", 0)) > step)]
        if len(kept) != len(records):
            atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        """Flush and close the sinks (reopened lazily by the next write)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()


class Progress:
    """A tqdm bar over optimizer steps, plus one printed line per epoch; silent when disabled."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True,
                             unit="step", file=sys.stderr)

    def update(self, n: int = 1) -> None:
        """Advance the bar by n steps."""
        if self._bar is not None:
            self._bar.update(n)

    def set(self, desc: str | None = None, **fields: Any) -> None:
        """Change the description and/or the postfix fields (drawn at the next refresh)."""
        if self._bar is None:
            return
        if desc is not None:
            self._bar.set_description(desc, refresh=False)
        self._bar.set_postfix({k: v for k, v in fields.items() if v is not None}, refresh=False)

    def line(self, text: str) -> None:
        """Print one line to stderr without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def fmt_value(value: Any, spec: str) -> str:
    """`value` formatted with `spec`; "-" for None, str(value) where the spec does not apply."""
    if value is None:
        return "-"
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def epoch_line(head: str, rec: dict) -> str:
    """One console line for an epoch record: `head`, loss, train/test top-1 (%), lr and img/s."""
    parts = [head, f"loss {fmt_value(rec.get('loss'), '.4f')}", f"acc {fmt_value(rec.get('train_top1'), '.2f')}%"]
    if "test_top1" in rec:
        parts.append(f"test top1 {fmt_value(rec['test_top1'], '.2f')}%")
    parts += [f"lr {fmt_value(rec.get('lr'), '.4g')}", f"{fmt_value(rec.get('img_s'), '.0f')} img/s"]
    return " | ".join(parts)

"""Per-step overhead of regprune's Trainer against a bare hand-written PyTorch training loop.

Both loops train the same architecture (same init) on the same pre-generated random batches with the same
SGD settings. After a warm-up, they run interleaved (trainer, bare, trainer, bare, ...) for `--repeats`
rounds of `--steps` steps each; the median seconds per step of each and their ratio are printed and written
to benchmarks/results/engine_overhead.json.

    python benchmarks/engine_overhead.py --steps 50 --repeats 7 --model resnet20
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regprune.engine import TrainConfig, Trainer, atomic_write_text, resolve_device  # noqa: E402
from regprune.models import create_model  # noqa: E402

__all__ = ["main", "bare_loop", "CyclicBatches"]

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


class CyclicBatches:
    """A loader stand-in: `length` batches per epoch cycled from a fixed list, with no data-loading cost."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.batches = batches
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


def bare_loop(model: torch.nn.Module, batches: list, amp: bool, channels_last: bool) -> Callable[[int], None]:
    """The hand-written reference: returns run(n) that trains n steps."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    state = {"i": 0}

    def run(n: int) -> None:
        for _ in range(n):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext():
                loss = F.cross_entropy(model(x), y)
            if amp:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()

    return run


def trainer_loop(model: torch.nn.Module, batches: list, steps: int, device: str, amp: bool,
                 channels_last: bool) -> Callable[[int], None]:
    """The Trainer doing the same work: returns run(n) that continues training for n more steps."""
    cfg = TrainConfig(max_steps=0, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, device=device, amp=amp,
                      channels_last=channels_last, progress=False, eval_every_epoch=False, log_every=50)
    trainer = Trainer(model, CyclicBatches(batches, steps), None, cfg)

    def run(n: int) -> None:
        trainer.config.max_steps = trainer.step + n
        trainer.fit()

    return run


def timed(fn: Callable[[int], None], n: int, device: torch.device) -> float:
    """Seconds per step of fn(n), with the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn(n)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write its JSON report; returns the report."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds per loop")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per loop first")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--num-batches", type=int, default=8, help="distinct random batches cycled through")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "engine_overhead.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    amp = args.amp and device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 1, args.image_size, args.image_size, generator=g).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(device)) for _ in range(args.num_batches)]

    torch.manual_seed(0)
    model_t = create_model(args.model, num_classes=10, in_channels=1).to(device)
    torch.manual_seed(0)
    model_b = create_model(args.model, num_classes=10, in_channels=1).to(device)
    if args.channels_last:
        model_b.to(memory_format=torch.channels_last)
    run_t = trainer_loop(model_t, batches, args.steps, str(device), amp, args.channels_last)
    run_b = bare_loop(model_b, batches, amp, args.channels_last)

    run_t(args.warmup)
    run_b(args.warmup)
    t_times, b_times = [], []
    for r in range(args.repeats):
        t_times.append(timed(run_t, args.steps, device))
        b_times.append(timed(run_b, args.steps, device))
        print(f"round {r + 1}/{args.repeats}: trainer {t_times[-1] * 1e3:.2f} ms/step, "
              f"bare {b_times[-1] * 1e3:.2f} ms/step", flush=True)

    t_med, b_med = statistics.median(t_times), statistics.median(b_times)
    ratio = t_med / b_med
    report = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "batch_size": args.batch_size, "image_size": args.image_size, "steps": args.steps,
        "repeats": args.repeats, "warmup": args.warmup, "amp": amp, "channels_last": args.channels_last,
        "trainer_ms_per_step_median": t_med * 1e3, "bare_ms_per_step_median": b_med * 1e3,
        "ratio": ratio, "overhead_pct": (ratio - 1.0) * 100.0,
        "trainer_ms_per_step": [t * 1e3 for t in t_times], "bare_ms_per_step": [t * 1e3 for t in b_times],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print(f"median: trainer {t_med * 1e3:.2f} ms/step, bare {b_med * 1e3:.2f} ms/step, "
          f"ratio {ratio:.3f} ({report['overhead_pct']:+.1f}%)")
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

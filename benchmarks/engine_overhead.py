"""Per-step overhead of regprune's Trainer against a bare hand-written PyTorch training loop, on the same
model, init, random batches and SGD settings, interleaved in rounds (see benchmarks/README.md). Writes
benchmarks/results/engine_overhead.json.

    python benchmarks/engine_overhead.py --steps 50 --repeats 7 --model resnet20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path)

import torch  # noqa: E402

from regprune.engine import TrainConfig, Trainer, atomic_write_text, resolve_device  # noqa: E402
from regprune.models import create_model  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def main(argv: list[str] | None = None) -> dict:
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
    ap.add_argument("--out", type=Path, default=H.HERE / "results" / "engine_overhead.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    amp = args.amp and device.type == "cuda"
    batches = H.make_batches(args.num_batches, args.batch_size, device, args.image_size)
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=0, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, device=str(device), amp=amp,
                      channels_last=args.channels_last, progress=False, eval_every_epoch=False, log_every=50)
    epoch = [batches[i % len(batches)] for i in range(args.steps)]  # a loader without data-loading cost
    trainer = Trainer(create_model(args.model, num_classes=10, in_channels=1).to(device), epoch, None, cfg)
    bare = H.Stepper("plain", device, batches, amp, args.channels_last, model=args.model, lr=LR)

    def run_trainer(n: int) -> None:  # the Trainer continues for n more steps
        trainer.config.max_steps = trainer.step + n
        trainer.fit()

    run = {"trainer": run_trainer, "bare": bare.run}
    for f in run.values():
        f(args.warmup)

    def note(r: int, wall: dict, cpu: dict) -> None:
        print(f"round {r + 1}/{args.repeats}: trainer {wall['trainer'][-1] * 1e3 / args.steps:.2f} ms/step, "
              f"bare {wall['bare'][-1] * 1e3 / args.steps:.2f} ms/step", flush=True)

    wall, _ = H.interleaved({k: lambda f=f: f(args.steps) for k, f in run.items()}, args.repeats,
                            sync=H.sync_of(device), note=note)
    t_times, b_times = ([t / args.steps for t in wall[k]] for k in run)
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

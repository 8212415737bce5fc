"""Where SPM's nuclear-norm term is cheapest to compute: its SVDs on the GPU, batched by shape on the GPU, or on
the CPU, for the gated convolutions of ResNet-20 (the network of benchmarks/cost.py). Forward and backward of the
term, median of timed repeats with CUDA synchronisation; the three values must agree.

    python benchmarks/nuclear_svd.py        # needs a CUDA device
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from regprune.methods.gates import insert_gates  # noqa: E402
from regprune.methods.spm import SPMRegularizer  # noqa: E402
from regprune.models import create_model  # noqa: E402


def terms(reg: SPMRegularizer, where: str) -> torch.Tensor:
    """Sum over gated convs of | ||W||_* - ||diag(m) W||_* | with the SVDs done `where`."""
    g = reg.gates.graph
    pairs = [(g.module(n).weight.detach().float().flatten(1), reg.gates.gate(r).mask().float()) for n, r in reg.nuc_layers]
    if where == "cpu":
        pairs = [(w.cpu(), m.cpu()) for w, m in pairs]
    if where == "batched":
        by_shape = defaultdict(list)
        for w, m in pairs:
            by_shape[tuple(w.shape)].append((w, m))
        out = []
        for group in by_shape.values():
            w = torch.stack([p[0] for p in group])
            m = torch.stack([p[1] for p in group])
            s = torch.linalg.svdvals(torch.cat([w, m.unsqueeze(2) * w])).sum(1)
            out.append((s[: len(group)] - s[len(group):]).abs().sum())
        return torch.stack(out).sum()
    return sum((torch.linalg.svdvals(w).sum() - torch.linalg.svdvals(m.unsqueeze(1) * w).sum()).abs() for w, m in pairs)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model = create_model("resnet20", num_classes=10, in_channels=1)
    gates = insert_gates(model, torch.zeros(1, 1, 28, 28))
    reg = SPMRegularizer(gates, 0.5, alpha_nuc=1e-3, alpha_mac=20.0, mac_norm="dense")
    model.to(dev)  # the gates live on the model (model.regprune_gates)
    with torch.no_grad():
        for p in gates.parameters():
            p.uniform_(-1, 1)
    print(f"{len(reg.nuc_layers)} gated convs, shapes {sorted({tuple(gates.graph.module(n).weight.flatten(1).shape) for n, _ in reg.nuc_layers})}")
    values, times = {}, {}
    for where in ("gpu", "batched", "cpu") * 2:
        ts = []
        for _ in range(25):
            sync()
            t0 = time.perf_counter()
            v = terms(reg, where)
            v.backward()
            sync()
            ts.append(time.perf_counter() - t0)
        values[where] = float(v.detach())
        times.setdefault(where, []).append(statistics.median(ts[5:]) * 1e3)
    for k in times:
        print(f"{k:8s} forward+backward {' / '.join(f'{t:.2f}' for t in times[k])} ms (two passes), value {values[k]:.6g}")


if __name__ == "__main__":
    main()

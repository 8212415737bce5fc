"""SPM (pruning from scratch) with and without its nuclear-norm loss, against L1 pruning of a trained dense model,
at one MACs target over several paired seeds, every variant with the same total epochs (benchmarks/README.md
describes the variants and the report).

    python benchmarks/spm_ablation.py --scale smoke              # seconds; what the test runs
    nice -n 10 python benchmarks/spm_ablation.py --scale cpu     # ResNet-20, ~20 min on 2 quiet CPU cores
    python benchmarks/spm_ablation.py --scale gpu --jobs 9       # ResNet-56, all data, --device cuda --amp
    python benchmarks/spm_ablation.py --scale gpu --dry-run      # print the plan only

Writes benchmarks/results/spm_ablation_<scale>.{md,json,png}.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as H  # noqa: E402  (puts the repository root on sys.path too)
from harness import fmt_pm  # noqa: E402

import torch  # noqa: E402

from regprune import engine as E  # noqa: E402
from regprune.errors import UserError  # noqa: E402
from regprune.models import create_model  # noqa: E402
from regprune.pipeline import JobOptions, RunDir, prune_job, prune_plan, train_job  # noqa: E402
from regprune.scratch import scratch_dry_run, scratch_job, spm_settings  # noqa: E402

DATA = "fashion-mnist"
FASHION_TRAIN, FASHION_TEST = 60000, 10000
VARIANTS = ("spm", "spm_no_nuc", "l1")
LABELS = {
    "spm": "SPM: nuclear + MACs losses (`regprune scratch` defaults)",
    "spm_no_nuc": "SPM: MACs loss only (alpha_nuc = 0)",
    "l1": "L1 pruning of a trained dense model + fine-tuning",
    "dense": "dense, no pruning (the L1 base; reference)",
}
COMPARISONS = (("spm", "spm_no_nuc"), ("spm", "l1"), ("spm_no_nuc", "l1"))


@dataclass
class Settings(H.BaseSettings):
    model: str = "resnet20"
    target_macs: float = 0.41   # kept fraction of dense MACs, the same for every variant
    epochs: float = 2           # scratch runs AND the dense base of L1 (the same budget)
    lr: float = 0.05
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    ft_epochs: float = 1        # L1's fine-tuning after removal
    ft_lr: float = 0.01
    ft_schedule: str = "cosine"
    search_epochs: float | None = None  # None: `regprune scratch`'s default, 65/90 of the epochs
    alpha_nuc: float | None = None      # variant spm's nuclear weight; None: the library default
    snap: bool = True           # the library's budget snap at S_max, so every variant meets the same MACs budget
    threads: int = 0
    methods: list[str] = field(default_factory=lambda: list(VARIANTS))


SCALES: dict[str, Settings] = {
    "smoke": Settings(scale="smoke", seeds=2, batch_size=32, epochs=2, lr=0.05, ft_epochs=1, limit_train=128,
                      limit_test=64, threads=1),
    # ~20 minutes on 2 quiet CPU cores; batch 32 gives the gates ~440 search steps
    "cpu": Settings(scale="cpu", seeds=3, batch_size=32, epochs=10, lr=0.05, ft_epochs=3, limit_train=2000,
                    limit_test=1000),
    # the paper's 90-epoch schedule with the gates frozen at epoch 65; L1 fine-tunes for a third of that
    "gpu": Settings(scale="gpu", model="resnet56", seeds=3, batch_size=128, epochs=90, lr=0.1, warmup_epochs=1.0,
                    ft_epochs=30, limit_train=None, limit_test=None, device="cuda", amp=True, workers=4),
}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--target-macs", type=float, help="kept fraction of dense MACs for every variant (default 0.41)")
    ap.add_argument("--epochs", type=float, help="epochs of each scratch run and of each dense base")
    ap.add_argument("--search-epochs", type=float, help="SPM epochs with gates learning (default: 65/90 of --epochs)")
    ap.add_argument("--ft-epochs", type=float, help="L1's fine-tuning epochs after removal")
    ap.add_argument("--lr", type=float, help="lr of the scratch runs and the dense bases")
    ap.add_argument("--ft-lr", type=float, help="L1's fine-tuning lr")
    ap.add_argument("--alpha-nuc", type=float, help="nuclear-norm weight of variant spm (default: the library's)")
    ap.add_argument("--snap", action=argparse.BooleanOptionalAction, default=None,
                    help="the library's budget snap at S_max for the SPM variants (default on: every variant at the "
                         "same MACs; --no-snap shows where the search alone ends)")


def jobs(s: Settings) -> list[dict[str, Any]]:
    if not 0.0 < s.target_macs < 1.0:
        raise UserError(f"--target-macs {s.target_macs:g}: expected a kept fraction in (0, 1)")
    if s.epochs <= 0 or s.ft_epochs < 0:
        raise UserError("--epochs must be > 0 and --ft-epochs >= 0")
    for v in VARIANTS[:2]:
        spm_settings(1, s.epochs + s.ft_epochs, spm_extra(s, v))  # the library's own message for a bad search length
    return [{"variant": v, "seed": k} for k in range(s.seeds) for v in s.methods]


def spm_extra(s: Settings, variant: str) -> dict[str, Any]:
    """What the variant passes to `scratch_job` beyond `regprune scratch`'s defaults."""
    extra: dict[str, Any] = {"exact_budget": s.snap}
    if s.search_epochs is not None:
        extra["search_epochs"] = s.search_epochs
    if variant == "spm_no_nuc" or s.alpha_nuc is not None:
        extra["alpha_nuc"] = 0.0 if variant == "spm_no_nuc" else s.alpha_nuc
    return extra


def job_options(s: Settings, seed: int, **kw: Any) -> JobOptions:
    flat = dict(model=s.model, data=DATA, seed=seed, batch_size=s.batch_size, workers=s.workers, device=s.device,
                amp=s.amp, progress=False, limit_train=s.limit_train, limit_test=s.limit_test, epochs=s.epochs, lr=s.lr,
                lr_schedule=s.lr_schedule, warmup_epochs=s.warmup_epochs, weight_decay=s.weight_decay,
                momentum=s.momentum, target_macs=s.target_macs) | kw
    return JobOptions.from_dict(flat)  # flat names, as on the command line


def epochs_of(s: Settings, variant: str) -> dict[str, float]:
    if variant == "l1":
        return {"base": s.epochs, "finetune": s.ft_epochs, "total": s.epochs + s.ft_epochs}
    return {"scratch": s.epochs + s.ft_epochs, "total": s.epochs + s.ft_epochs}


def _fresh(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(model, num_classes=10, in_channels=1)


def l1_plan(s: Settings) -> dict[str, Any]:
    """The ratios regprune's solver picks for L1 at the MACs target (no data needed)."""
    _, plan = prune_plan(job_options(s, 0, method="l1"), _fresh(s.model), torch.zeros(1, *H.INPUT_SHAPE))
    return {"ratios": plan.ratios, "removal": plan.removal, "macs_fraction": plan.pruned_macs / plan.dense_macs}


def estimate(s: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The plan (L1's ratios, each SPM variant's scratch settings) and, on CPU, a time estimate from measured
    throughput (the pruned fine-tuning counted as dense: an upper bound; ~15 s of fixed work per job)."""
    plan: dict[str, Any] = {"l1_plan": l1_plan(s)}
    for v in VARIANTS:
        print(f"  {v}: {LABELS[v]}; training epochs {epochs_of(s, v)}")
    for v in VARIANTS[:2]:
        if args.dry_run:
            print(f"  --- {v}: what `regprune scratch` will do (its --dry-run) ---")
            scratch_dry_run(job_options(s, 0), spm_extra(s, v))
        else:
            print(f"  {v}: scratch settings {spm_settings(int(1e6), s.epochs + s.ft_epochs, spm_extra(s, v))}")
    print(f"  --- l1: ratios for {100 * s.target_macs:.1f}% of dense MACs (plan reaches "
          f"{100 * plan['l1_plan']['macs_fraction']:.2f}%): {plan['l1_plan']['ratios']}", flush=True)
    if str(s.device).startswith("cpu"):
        tp = H.throughput(lambda: _fresh(s.model), s.batch_size)
        tp["gated_train_img_s"] = H.img_per_s(_fresh(s.model), s.batch_size, variant="spm")  # the search's step
        n_train, n_test = s.limit_train or FASHION_TRAIN, s.limit_test or FASHION_TEST
        train = (2 * (s.epochs + s.ft_epochs) * n_train / tp["gated_train_img_s"]  # the two scratch runs
                 + (s.epochs + s.ft_epochs) * n_train / tp["train_img_s"])  # dense base; pruned fine-tuning as dense
        evals = (3 * s.epochs + 3 * s.ft_epochs + 8) * n_test / tp["eval_img_s"]  # a test pass per epoch, + a few
        plan.update(throughput=tp, estimate_s=(train + evals + 4 * 15.0) * s.seeds / max(1, min(args.jobs, 3)))
        plan["summary"] = (f"estimated {plan['estimate_s'] / 60:.1f} min at {tp['train_img_s']:.0f} dense / "
                           f"{tp['gated_train_img_s']:.0f} gated train img/s")
    return plan


# ---------------------------------------------------------------------------------------------- running
def run_one(s: Settings, ctx: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    """One variant at one seed in <work>/seed<k>/<variant>; the l1 job first trains its dense base (in `dense`)."""
    v, seed, path = job["variant"], job["seed"], ctx["work"] / f"seed{job['seed']}"
    if v == "l1":
        dense = run_dense(s, seed, path / "dense")
        return {**run_l1(s, seed, Path(dense["model_file"]), path / "l1"), "dense": dense}
    return run_spm(s, v, seed, path / v)


def _metrics(run: Path, kind: str) -> list[dict[str, Any]]:
    return [r for r in E.read_metrics(run / E.METRICS_FILE) if r.get("kind") == kind]


def epoch_curve(run: Path, phase: str) -> list[dict[str, float]]:
    return [{"epoch": r["epoch"], "test_top1": r["test_top1"], "train_loss": r.get("loss")}
            for r in _metrics(run, "epoch") if r.get("phase") == phase and "test_top1" in r]


def plateau(curve: list[dict[str, float]], tail: int = 3, tol: float = 0.3) -> dict[str, Any]:
    """Had test accuracy stopped rising? Best of the last `tail` epochs against the best before them."""
    accs = [c["test_top1"] for c in curve]
    if len(accs) <= tail:
        return {"plateaued": False, "reason": f"only {len(accs)} epochs", "gain_last_epochs": None,
                "tail_epochs": tail, "tolerance": tol}
    gain = max(accs[-tail:]) - max(accs[:-tail])
    return {"plateaued": gain <= tol, "gain_last_epochs": round(gain, 3), "tail_epochs": tail, "tolerance": tol}


def spm_groups(s: Settings) -> dict[str, dict[str, Any]]:
    """Channels of every gated group, and whether it is shared across a residual stream (SPM)."""
    from regprune.methods.spm import insert_gates

    gates = insert_gates(_fresh(s.model), torch.zeros(1, *H.INPUT_SHAPE))
    return {r: {"channels": gates.groups[r].channels, "shared": bool(gates.groups[r].coupled)} for r in gates.roots}


def _sizes(dense_row: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    return {"top1": float(row["top1"]), "top5": row.get("top5"), "params_M": row["params_M"], "MMACs": row["MMACs"],
            "dense_params_M": dense_row["params_M"], "dense_MMACs": dense_row["MMACs"]}


def run_spm(s: Settings, variant: str, seed: int, path: Path) -> dict[str, Any]:
    o = job_options(s, seed, out=str(path), epochs=epochs_of(s, variant)["total"])
    rep = scratch_job(o, RunDir(path, overwrite=True), spm_extra(s, variant))["report"]
    traj = _metrics(path, "spm")
    return {**_sizes(*rep["rows"]), "macs_fraction": float(rep["macs_fraction"]),
            "gated_top1": rep["gated"]["top1"], "search_macs_fraction": rep["search_macs_fraction"],
            "reconfig_max_abs_diff": rep["reconfig_max_abs_diff"], "spm_settings": rep["settings"],
            "snap": rep.get("snap"), "cut_shares": rep.get("cut_shares"),
            "kept_widths": traj[-1].get("kept") if traj else None,
            "macs_trajectory": [{"epoch": t["epoch"], "macs_fraction": t["macs_fraction"], "frozen": t.get("frozen")}
                                for t in traj],
            "latency_speedup_b1": rep["latency_speedup_b1"], "epochs": epochs_of(s, variant),
            "curve": epoch_curve(path, "scratch"), "run_dir": str(path)}


def run_dense(s: Settings, seed: int, path: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = train_job(job_options(s, seed, out=str(path)), RunDir(path, overwrite=True))["row"]
    curve = epoch_curve(path, "train")
    return {"variant": "dense", "seed": seed, **_sizes(r, r), "macs_fraction": 1.0,
            "epochs": {"train": s.epochs, "total": s.epochs}, "curve": curve, "plateau": plateau(curve),
            "wall_s": round(time.perf_counter() - t0, 1), "run_dir": str(path),
            "model_file": str(path / "model.safetensors")}


def run_l1(s: Settings, seed: int, base_file: Path, path: Path) -> dict[str, Any]:
    o = job_options(s, seed, out=str(path), method="l1", base=str(base_file), ft_epochs=s.ft_epochs,
                    ft_lr=s.ft_lr, ft_lr_schedule=s.ft_schedule)
    rep = prune_job(o, RunDir(path, overwrite=True))["report"]
    dense_row, pruned_row = rep["rows"]
    plan = rep.get("plan") or {}
    return {**_sizes(dense_row, pruned_row), "macs_fraction": 1.0 / float(rep["macs_speedup"]),
            "base_top1": dense_row["top1"], "before_ft_top1": (rep.get("pruned_before_finetune") or {}).get("top1"),
            "best_top1": rep.get("best_top1"), "ratios": plan.get("ratios"),
            "plan_macs_fraction": plan["pruned_macs"] / plan["dense_macs"] if plan.get("dense_macs") else None,
            "latency_speedup_b1": rep["latency_speedup_b1"], "epochs": epochs_of(s, "l1"),
            "curve": epoch_curve(path, "finetune"), "run_dir": str(path)}


def expand(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job rows with each l1 job's dense base as a row of its own (the l1 row's wall time without it)."""
    out = []
    for r in rows:
        if d := r.get("dense"):
            out.append(d)
            r = {**{k: v for k, v in r.items() if k != "dense"}, "wall_s": round(r["wall_s"] - d["wall_s"], 1)}
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------- report
def summarize(rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Per-variant mean/std over seeds, and the comparisons against the seed spread."""
    order = (*VARIANTS, "dense")
    groups = H.summarize(rows, ("variant",), ("top1", "macs_fraction", "params_M", "search_macs_fraction",
                                              "gated_top1", "before_ft_top1"), order=lambda k: order.index(k[0]))
    for g in groups:
        rs = [r for r in rows if r["variant"] == g["variant"]]
        g.update(label=LABELS[g["variant"]], dense_params_M=rs[0]["dense_params_M"],
                 epochs_total=rs[0]["epochs"]["total"], epochs=rs[0]["epochs"])
        if g["variant"].startswith("spm"):
            g["reconfig_max_abs_diff_max"] = max(r["reconfig_max_abs_diff"] for r in rs)
        for k in [k for k in g if g[k] is None or g[k] == []]:  # metrics this variant does not have
            del g[k]
    comps = H.compare(groups, rows, (), "top1", pairs=COMPARISONS, label="variant")
    by = {g["variant"]: g for g in groups}
    for c in comps:
        c.update(delta_mean=c["diff"], paired_deltas=c["paired_diffs"],
                 macs_fraction_gap=by[c["a"]]["macs_fraction_mean"] - by[c["b"]]["macs_fraction_mean"])
    return groups, comps


def _row(g: dict[str, Any]) -> tuple:
    ep, v = g["epochs"], g["variant"]
    notes = "-"
    if v.startswith("spm"):
        ends = ", ".join("?" if x is None else f"{x:.3f}" for x in g.get("search_macs_fraction_values", []))
        notes = f"search ended at {ends} of dense MACs before the snap; reconfiguration max abs diff " \
                f"{g['reconfig_max_abs_diff_max']:.1e}"
    elif v == "l1":
        notes = f"top-1 right after removal: {g['before_ft_top1_mean']:.2f} (mean)"
    epochs = f"{ep['total']:g} ({ep['base']:g} base + {ep['finetune']:g} fine-tune)" if v == "l1" else f"{ep['total']:g}"
    return (f"{v}: {g['label']}", epochs, fmt_pm(g["macs_fraction_mean"], g["macs_fraction_std"], 3),
            f"{g['params_M_mean']:.4f}", fmt_pm(g["top1_mean"], g["top1_std"]),
            ", ".join(f"{x:.2f}" for x in g["top1_values"]), notes)


def markdown(result: dict[str, Any]) -> str:
    s, d, a = result["settings"], result["data"], result.get("spm_settings", {}).get("spm", {})
    sa = lambda k: "?" if k not in a else f"{a[k]:g}" if isinstance(a[k], float) else str(a[k])  # noqa: E731
    lines = H.header_lines(result, "SPM ablation: pruning from scratch with / without the nuclear-norm loss, vs L1") + [
        f"Model {s['model']} (1-channel input); Fashion-MNIST, {d['train_images']} training / {d['test_images']} test "
        f"images{' (class-balanced subsets)' if d['subset'] else ''}. Target **{100 * s['target_macs']:.1f}% of dense "
        f"MACs** ({1 / s['target_macs']:.2f}x fewer). L1: dense base {s['epochs']:g} epochs (lr {s['lr']:g} "
        f"{s['lr_schedule']}, warm-up {s['warmup_epochs']:g}), fine-tuning {s['ft_epochs']:g} (lr {s['ft_lr']:g} "
        f"{s['ft_schedule']}); SPM: {s['epochs'] + s['ft_epochs']:g} epochs, gates learning for {sa('search_epochs')}. "
        f"Batch {s['batch_size']}, momentum {s['momentum']:g}, weight decay {s['weight_decay']:g}. SPM: alpha_nuc "
        f"{sa('alpha_nuc')} (spm_no_nuc 0), alpha_mac {sa('alpha_mac')} ({sa('mac_norm')} scale), gate lr "
        f"x{sa('gate_lr_scale')}, budget snap at S_max {'on' if s.get('snap', True) else 'off'}. L1 ratios: "
        f"{result.get('l1_plan', {}).get('ratios')}. {s['seeds']} paired seed(s).", ""]
    lines += H.md_table(["variant", "training epochs", "MACs fraction (mean ± std)",
                         f"params M (dense {result['summary'][0]['dense_params_M']:.4f})", "top-1 % (mean ± std)",
                         "per seed", "notes"], [_row(g) for g in result["summary"]])
    lines += [""] + H.md_table(
        ["a vs b", "Δ mean", "spread", "Δ per seed (paired)", "exceeds the seed spread?", "same sign every seed"],
        [(f"{c['a']} vs {c['b']}", f"{c['delta_mean']:+.2f}", f"{c['spread']:.2f}",
          ", ".join(f"{x:+.2f}" for x in c["paired_deltas"]), H.verdict(c),
          "yes" if c["paired_same_sign"] else "no")
         for c in result["comparisons"]])
    groups = result.get("spm_groups") or {}
    spm_rows = [r for r in result["results"] if r["variant"].startswith("spm") and r.get("kept_widths")]
    if groups and spm_rows:
        lines += ["", "Channels kept per gated group by the SPM runs (dense count in brackets; * = one gate for a "
                  "whole residual stream):", ""]
        lines += H.md_table(["run", *(f"{r}{'*' if g['shared'] else ''} ({g['channels']})" for r, g in groups.items())],
                            [(f"{r['variant']} s{r['seed']}", *(r["kept_widths"].get(g, "-") for g in groups))
                             for r in spm_rows])
    if result.get("plot"):
        lines += ["", f"Figure: `{Path(result['plot']).name}`."]
    return "\n".join(lines + ["", "Notes:", *(f"- {n}" for n in result.get("notes", []))]) + "\n"


def accuracy_plot(path: Path, rows: list[dict[str, Any]], groups: list[dict[str, Any]], target: float) -> Path:
    """Top-1 against the achieved MACs fraction: seeds as faint points, mean ± std per variant, the dense bases'
    mean as a dotted line, the target as a dotted vertical line."""
    fig, ax = H.pyplot().subplots(figsize=(7.5, 4.6), dpi=110)
    style = {"spm": ("#1f77b4", "o"), "spm_no_nuc": ("#ff7f0e", "s"), "l1": ("#2ca02c", "^"), "dense": ("#7f7f7f", "D")}
    for g in groups:
        color, marker = style[g["variant"]]
        if g["variant"] == "dense":
            ax.axhline(g["top1_mean"], color=color, linestyle=":",
                       label=f"dense base: {fmt_pm(g['top1_mean'], g['top1_std'])}")
            continue
        ax.scatter(*zip(*[(r["macs_fraction"], r["top1"]) for r in rows if r["variant"] == g["variant"]]),
                   color=color, marker=marker, alpha=0.35, s=20)
        ax.errorbar(g["macs_fraction_mean"], g["top1_mean"], xerr=g["macs_fraction_std"], yerr=g["top1_std"],
                    color=color, marker=marker, markersize=7, capsize=4,
                    label=f"{g['variant']} ({g['epochs_total']:g} ep): {fmt_pm(g['top1_mean'], g['top1_std'])}")
    ax.axvline(target, color="gray", linestyle=":", linewidth=1)
    ax.set(xlabel="MACs kept (fraction of dense)", ylabel="test top-1 (%)")
    ax.set_title("SPM ablation: accuracy vs MACs (mean ± std over seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return H.save_fig(fig, path)


def make_notes(s: Settings, rows: list[dict]) -> list[str]:
    """Whether the dense bases' accuracy had plateaued, and the share of each SPM variant's MACs cut done by the
    search and by the library's budget snap."""
    notes = []
    if plats := [r["plateau"] for r in rows if r["variant"] == "dense"]:
        gains = ", ".join("n/a" if p["gain_last_epochs"] is None else f"{p['gain_last_epochs']:+.1f}" for p in plats)
        notes.append(f"Dense bases: test accuracy had plateaued (best of the last 3 epochs within 0.3 points of the "
                     f"best before them) on {sum(bool(p['plateaued']) for p in plats)} of {len(plats)} seeds (gains "
                     f"over the last 3 epochs: {gains}).")
    for v in ("spm", "spm_no_nuc"):
        if got := [r for r in rows if r["variant"] == v and r.get("cut_shares")]:
            moves = sum(int(r["snap"]["flips"]) for r in got if r.get("snap"))
            notes.append(f"{v}: share of the MACs cut done by the search itself, per seed: "
                         + ", ".join(f"{100 * r['cut_shares']['search']:.0f}%" for r in got)
                         + (f"; the rest by the budget snap ({moves} channel moves in all)."
                            if any(r.get("snap") for r in got) else " (no snap)."))
    return notes


def main(argv: list[str] | None = None) -> dict[str, Any]:
    r = H.main(BENCH, argv)
    if r["dry_run"]:
        return {"settings": r["settings"], "plan": r["plan"], "dry_run": True}
    s = r["settings_obj"]
    rows = expand(r["rows"])
    groups, comps = summarize(rows)
    out_dir, stem = r["args"].out_dir.resolve(), f"spm_ablation_{s.scale}"
    n_train, n_test = s.limit_train or FASHION_TRAIN, s.limit_test or FASHION_TEST
    result = {
        "benchmark": "spm_ablation", "scale": s.scale, "argv": r["argv"], "started": r["date"],
        "wall_time_s": round(r["wall_time_s"], 1), "hardware": r["hardware"], "n_workers": r["n_workers"],
        "settings": r["settings"], "plan": r["plan"], "l1_plan": (r["plan"] or {}).get("l1_plan") or l1_plan(s),
        "spm_settings": {v: next(x["spm_settings"] for x in rows if x["variant"] == v)
                         for v in ("spm", "spm_no_nuc") if any(x["variant"] == v for x in rows)},
        "epochs_per_variant": {v: epochs_of(s, v) for v in VARIANTS},
        "data": {"spec": DATA, "train_images": n_train, "test_images": n_test,
                 "subset": n_train < FASHION_TRAIN or n_test < FASHION_TEST},
        "results": rows, "summary": groups, "comparisons": comps, "plot": str(out_dir / f"{stem}.png"),
        "work_dir": str(r["work"]), "spm_groups": spm_groups(s), "jobs_done": r["jobs_done"],
        "jobs_expected": r["jobs_expected"], "complete": r["complete"],
        "jobs_wall_s": round(sum(x["wall_s"] for x in r["rows"]), 1), "notes": make_notes(s, rows),
    }
    return H.write_outputs(result, out_dir, stem, markdown,
                           [lambda d: accuracy_plot(d / f"{stem}.png", rows, groups, s.target_macs)])


BENCH = H.Bench(name="spm_ablation", doc=__doc__, scales=SCALES, methods=VARIANTS, script=Path(__file__).resolve(),
                job_keys=("variant", "seed"), jobs=jobs, prepare=lambda s, work: {"work": work}, run_one=run_one,
                add_args=add_args, default_scale="cpu", estimate=estimate, dense_model=lambda s: _fresh(s.model))

if __name__ == "__main__":
    H.run_script(main)

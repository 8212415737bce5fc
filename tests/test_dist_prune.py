"""`regprune prune --method greg2` on two CPU ranks (torchrun, gloo): the ranks agree and only rank 0 writes.

With --debug-rank-dump DIR the prune job writes each rank's view of every phase boundary (picks, a hash of
GReg's penalties and of its masks, a hash of all weights and buffers) to DIR; the dumps of both ranks must be
identical. The CLI runs through a small launcher that, on ranks other than 0, records every Python-level write
into the run directory (audit hooks: open for writing, rename, mkdir, remove, ...); there must be none. The run
directory itself must hold one set of files: each metrics record once, no stray temporary files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
PHASES = ["base", "plan", "regularize", "prune", "finetune"]

LAUNCHER = textwrap.dedent(r'''
    """Run `python -m regprune ARGS`; on ranks > 0, first record any write into the run directory."""
    import json, os, runpy, sys

    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        run_dir = os.path.realpath(os.environ["RP_TEST_RUN_DIR"])
        writes = []

        def inside(p):
            try:
                p = os.path.realpath(os.fsdecode(p))
            except (TypeError, ValueError):
                return False
            return p == run_dir or p.startswith(run_dir + os.sep)

        WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
        EVENTS = {"os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.utime",
                  "os.symlink", "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile"}

        def audit(event, args):
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                if path is None or isinstance(path, int):
                    return
                writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                    (isinstance(flags, int) and flags & WRITE_FLAGS)
                if writing and inside(path):
                    writes.append([event, os.fsdecode(path)])
            elif event in EVENTS:
                hits = [os.fsdecode(a) for a in args if isinstance(a, (str, bytes, os.PathLike)) and inside(a)]
                if hits:
                    writes.append([event] + hits)

        def report():
            with open(os.environ["RP_TEST_WRITES"] + f".rank{rank}.json", "w") as f:
                json.dump(writes, f)

        import atexit
        atexit.register(report)
        sys.addaudithook(audit)
    sys.argv = ["regprune"] + sys.argv[1:]
    runpy.run_module("regprune", run_name="__main__", alter_sys=True)
''')


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_two_ranks_agree_at_every_phase_and_only_rank0_writes(tmp_path):
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    launcher = tmp_path / "launch_regprune.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               RP_TEST_RUN_DIR=str(run), RP_TEST_WRITES=str(tmp_path / "writes"),
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher),
         "prune", "--method", "greg2", "--model", "resnet20", "--data", "digits", "--limit-train", "256",
         "--limit-test", "128", "--base", "random", "--speedup", "2", "--reg-iters", "30", "--ft-epochs", "1",
         "--batch-size", "32", "--checkpoint-every", "5", "--seed", "1", "--no-progress", "--out", str(run),
         "--debug-rank-dump", str(dumps)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert proc.stdout.count("MACs speedup") == 1, proc.stdout  # only rank 0 prints

    # every rank saw the same picks, penalties, masks and weights at every phase boundary
    for phase in PHASES:
        views = [json.loads((dumps / f"rank{r}_{phase}.json").read_text()) for r in (0, 1)]
        assert [v.pop("rank") for v in views] == [0, 1]
        assert views[0]["world_size"] == 2
        assert views[0] == views[1], f"ranks disagree after {phase}"
    reg = json.loads((dumps / "rank0_regularize.json").read_text())
    assert reg["greg"]["phase"] == "done" and reg["greg"]["gates"] and reg["greg"]["picks"] == reg["picks"]
    assert reg["picks"] and any(reg["picks"].values())
    assert json.loads((run / "picks.json").read_text()) == reg["picks"]
    assert sorted(p.name for p in dumps.iterdir()) == sorted(f"rank{r}_{p}.json" for r in (0, 1) for p in PHASES)

    # rank 1 wrote nothing into the run directory (the audit ran: its report exists)
    assert json.loads((tmp_path / "writes.rank1.json").read_text()) == []

    # one set of files: each metrics record once, nothing half-written, no per-rank copies
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp") or ".tmp" in f or "rank" in f], files
    for name in ("options.json", "state.json", "metrics.jsonl", "greg_state.pt", "regularized.safetensors",
                 "pruned_init.safetensors", "picks.json", "model.safetensors", "report.json",
                 "checkpoints/regularize.pt", "checkpoints/finetune.pt"):
        assert name in files, (name, files)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = [(r["phase"], r["step"], r.get("kind"), r.get("greg_phase")) for r in records]
    assert len(keys) == len(set(keys)), "metrics records written more than once"
    assert {r["phase"] for r in records} == {"regularize", "finetune"}
    assert json.loads((run / "state.json").read_text())["done"] == PHASES

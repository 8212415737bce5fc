"""The one configuration schema (regprune.jobs.options): nested sections, type checks from the type hints, the
command-line flags derived from it, recipes (flat and nested) and options.json (nested now, flat from older
versions) all loading to the same JobOptions."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from regprune.cli import build_parser
from regprune.errors import UserError
from regprune.jobs.options import OPTIONS, SECTIONS, JobOptions, merge_options, options_for
from regprune.jobs.scratch import spm_overrides

ROOT = Path(__file__).resolve().parents[1]

# options.json exactly as the flat schema of earlier versions wrote it (every field, flat names)
OLD_FLAT = {
    "model": "resnet56", "data": "digits", "out": "runs/old", "seed": 3, "batch_size": 64, "workers": 0,
    "limit_train": 200, "limit_test": None, "device": "cpu", "amp": False, "channels_last": False, "progress": False,
    "checkpoint_every": 0, "shortcut": None, "epochs": 10, "lr": 0.1, "lr_schedule": "cosine",
    "warmup_epochs": 0.0, "momentum": 0.8, "nesterov": False, "weight_decay": 0.0005, "no_wd_bn_bias": False,
    "label_smoothing": 0.0, "method": "greg2", "base": "runs/base/model.safetensors", "ratios": None,
    "speedup": 2.0, "target_macs": None, "skip": ["fc"], "round_to": 8, "include_coupled": False, "pick": "min",
    "criterion": "filter", "unstructured": False, "sparsity": None, "penalty": "group", "penalize_coupled": False,
    "bn_recal": 50, "reg_iters": 600, "reg_batch_size": None, "greg": {"update_reg_interval": 5}, "ft_epochs": 3,
    "ft_lr": 0.02, "ft_lr_schedule": "constant", "ft_warmup_epochs": 0.5, "search_epochs": None,
    "alpha_nuc": None, "alpha_mac": None, "nuc_every": None, "mac_grad_inputs": None, "mac_norm": None,
    "gate_lr_scale": None, "exact_budget": None, "tie_spread": None, "snap_floor": None, "debug_rank_dump": None,
}


def test_every_old_flat_name_is_an_option_and_maps_to_one_place():
    assert set(OLD_FLAT) == set(OPTIONS)
    places = {(o.section, o.name) for o in OPTIONS.values()}
    assert len(places) == len(OPTIONS)
    assert OPTIONS["ft_lr"].section == "finetune" and OPTIONS["ft_lr"].name == "lr"
    assert OPTIONS["data"].section == "data" and OPTIONS["data"].name == "name"


def test_old_flat_options_json_resumes_into_the_nested_schema(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "options.json").write_text(json.dumps(OLD_FLAT))
    o = merge_options({}, {}, resume=str(run))
    assert o.run.model == "resnet56" and o.run.out == str(run)  # a resumed run keeps its directory
    assert o.data.name == "digits" and o.data.limit_train == 200
    assert o.train.momentum == 0.8 and o.finetune.lr == 0.02 and o.finetune.lr_schedule == "constant"
    assert o.prune.method == "greg2" and o.prune.skip == ["fc"] and o.prune.greg == {"update_reg_interval": 5}
    # older versions wrote a warm-up not given as 0 (scratch then took the official 8/90): it reads as not given
    assert o.train.warmup_epochs is None
    assert o.flat() == dict(OLD_FLAT, out=str(run), warmup_epochs=None)


def test_nested_options_json_round_trips(tmp_path):
    o = JobOptions.from_dict(dict(OLD_FLAT, out=str(tmp_path / "r")))
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "options.json").write_text(json.dumps(o.to_dict()))
    back = merge_options({}, {}, resume=str(tmp_path / "r"))
    assert back == o
    assert set(o.to_dict()) == set(SECTIONS)


def test_flat_nested_and_mixed_recipes_give_the_same_options(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model: resnet20\ndata: digits\nft-lr: 0.05\nmomentum: 0.85\nspeedup: 2\nskip: [fc]\n")
    nested = tmp_path / "nested.yaml"
    nested.write_text("run: {model: resnet20}\ndata: {name: digits}\nfinetune: {lr: 0.05}\n"
                      "train: {momentum: 0.85}\nprune: {speedup: 2, skip: [fc]}\n")
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text("model: resnet20\ndata: digits\nfinetune: {lr: 0.05}\nmomentum: 0.85\nprune: {speedup: 2.0}\n"
                     "skip: [fc]\n")
    got = [merge_options({"method": "l1"}, {}, recipe=str(p)) for p in (flat, nested, mixed)]
    assert got[0] == got[1] == got[2]
    assert got[0].prune.speedup == 2.0 and isinstance(got[0].prune.speedup, float)  # an int passes as a float
    assert got[0].data.name == "digits" and got[0].finetune.lr == 0.05


def test_the_shipped_recipes_load():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        o = merge_options({}, {}, recipe=str(recipe))
        assert o.run.model, recipe.name


@pytest.mark.parametrize("values,match", [
    ({"lr": "fast"}, "option lr must be of type float"),
    ({"epochs": True}, "option epochs must be of type float"),  # a bool is not a number
    ({"seed": 1.5}, "option seed must be of type int"),
    ({"skip": ["fc", 3]}, "option skip must be of type list"),
    ({"greg": ["a"]}, "option greg must be of type dict"),
    ({"momentum": None}, "option momentum needs a value of type float"),
    ({"train": {"lrr": 0.1}}, "unknown option.*train.lrr"),
    ({"learning_rate": 0.1}, "unknown option.*learning_rate"),
    ({"train": 5}, "section train must be a mapping"),
])
def test_types_come_from_the_type_hints(values, match):
    with pytest.raises(UserError, match=match):
        JobOptions.from_dict(values)


def test_optional_values_accept_null():
    o = JobOptions.from_dict({"speedup": None, "limit_test": None, "shortcut": None})
    assert o.prune.speedup is None and o.data.limit_test is None


@pytest.mark.parametrize("command", ["train", "prune", "scratch"])
def test_cli_flags_are_the_schema_options_of_each_command(command):
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices[command]
    dests = {a.dest for a in sub._actions} - {"help", "overwrite", "resume", "recipe", "dry_run"}
    assert dests == {o.flat for o in options_for(command)}
    # every flag parses into the option's flat name, e.g. --ft-lr -> ft_lr
    if command == "prune":
        args = build_parser().parse_args(["prune", "--ft-lr", "0.03", "--no-progress", "--skip", "fc", "--skip", "x"])
        assert args.ft_lr == 0.03 and args.progress is False and args.skip == ["fc", "x"]


def test_scratch_warmup_zero_from_a_recipe_is_kept(tmp_path):
    # None (not given) means the official 8/90 of the epochs; an explicit 0 from a recipe stays 0
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet20\ntarget_macs: 0.5\nwarmup_epochs: 0\n")
    o = merge_options({"epochs": 10}, {}, recipe=str(recipe))
    assert spm_overrides(o)["warmup_epochs"] == 0.0
    assert "warmup_epochs" not in spm_overrides(merge_options({"target_macs": 0.5}, {}))


def test_options_json_written_by_a_run_is_nested_and_loads_again(tmp_path):
    from regprune.jobs.common import start_run

    o = JobOptions.from_dict({"model": "resnet20", "out": str(tmp_path / "run"), "lr": 0.2})
    run = start_run(o)
    saved = json.loads(run.file("options.json").read_text())
    assert saved == asdict(o) and saved["train"]["lr"] == 0.2
    assert merge_options({}, {}, resume=str(run.path)) == o


# ---- what a new user's mistakes must not do ------------------------------------------------------------------

def _cli(*argv):
    from regprune.cli import main

    return main(list(argv))


def test_overwrite_clears_only_run_directories_and_out_must_name_one(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    base = ["train", "--data", "digits", "--epochs", "0.01", "--limit-train", "32", "--limit-test", "16",
            "--no-progress"]
    assert _cli(*base, "--out", str(precious), "--overwrite") == 2
    assert "not a regprune run directory" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "years of work"
    assert _cli(*base, "--out", "") == 2
    assert "--out must name a directory" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert _cli(*base, "--out", str(tmp_path / "afile"), "--overwrite") == 2
    assert "is a file" in capsys.readouterr().err


def test_a_mistake_found_with_the_data_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert _cli("train", "--data", "cifar10:/nonexistent/cifar", "--epochs", "1", "--out", str(out)) == 2
    assert "regprune: error:" in capsys.readouterr().err
    assert not out.exists()  # the same command, corrected, runs without --overwrite


def test_resume_refuses_another_job_kind_and_changed_options(tmp_path, capsys):
    from regprune.jobs.common import start_run

    o = JobOptions.from_dict({"model": "resnet20", "out": str(tmp_path / "run"), "lr": 0.2})
    start_run(o, job="train")
    with pytest.raises(UserError, match="is a train run, not a scratch run"):
        start_run(o, resume=True, job="scratch")
    with pytest.raises(UserError, match="keeps the options it started with: lr was 0.2"):
        merge_options({}, {"lr": 0.5}, resume=str(tmp_path / "run"))
    with pytest.raises(UserError, match="drop --recipe"):
        merge_options({}, {}, resume=str(tmp_path / "run"), recipe=str(ROOT / "recipes" / "resnet56-cifar10-l1.yaml"))
    moved = merge_options({}, {"device": "cpu", "workers": 2}, resume=str(tmp_path / "run"))  # where, not what
    assert moved.run.device == "cpu" and moved.data.workers == 2 and moved.train.lr == 0.2


def test_recipe_values_as_yaml_writes_them(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("lr: 1e-3\nratios: 0.5\nseed: '7'\n")  # YAML 1.1 reads 1e-3 as a string
    o = merge_options({}, {}, recipe=str(r))
    assert o.train.lr == 0.001 and o.prune.ratios == "0.5" and o.run.seed == 7
    r.write_text("ratios: [0, 0.75, 0.75, 0.32, 0]\n")
    assert merge_options({}, {}, recipe=str(r)).prune.ratios == "[0,0.75,0.75,0.32,0]"
    for bad, match in (("shortcut: C", "shortcut must be one of A, B"), ("seed: 99999999999999999999", "seed must lie"),
                       ("method: greg3", "method must be one of"), ("lrr: 0.1", r"did you mean lr\b")):
        r.write_text(bad + "\n")
        with pytest.raises(UserError, match=match):
            merge_options({}, {}, recipe=str(r))


def test_every_shipped_recipe_dry_runs(capsys):
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        command = "scratch" if "spm" in recipe.name else "prune"
        assert _cli(command, "--recipe", str(recipe), "--dry-run") == 0, (recipe.name, capsys.readouterr().err)

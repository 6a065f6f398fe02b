"""The grid's plan: the study's cells, the commands `make paper` runs for them, and reruns that plan only what is missing."""

from __future__ import annotations

import os
import socket
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from common.errors import MedfmError
from common.study import MEDICAL_BACKBONES, MODERN_BACKBONES, STUDY_BACKBONES
from grid import estimate
from grid.jobs import Resources
from grid.plan import GridSpec, check_not_running, parse_resources, plan, reset_ended
from grid.state import mark, read_state, write_jobs
from ledger.records import RunRecord
from ledger.store import Ledger

LIVE = "--norm study --interpolation bilinear"


def spec(tmp_path: Path, **changes) -> GridSpec:
    return replace(GridSpec(output=str(tmp_path / "out"), data_root="/data"), **changes)


def commands(jobs) -> list[str]:
    return [" ".join([job.stage, *job.args]) for job in jobs]


def test_the_studys_grid_is_128_cells_in_160_jobs_each_probe_after_its_extraction(tmp_path: Path) -> None:
    p = plan(spec(tmp_path), tmp_path / "grid")
    assert len(p.cells) == 128 and p.done == set()
    assert Counter(job.stage for job in p.jobs) == {"extract": 32, "probe": 32, "finetune": 96}
    names = [job.name for job in p.jobs]
    for job in p.jobs:
        assert all(names.index(dep) < names.index(job.name) for dep in job.after)
        if job.stage == "probe":
            assert job.after == (job.name.replace("probe-", "extract-"),) and len(job.cells) == 1
    assert sum(len(job.cells) for job in p.jobs) == 128
    assert all(p.hours[job.name] > 0 for job in p.jobs)


def test_study_commands_are_the_ones_make_paper_ran(tmp_path: Path) -> None:
    p = plan(spec(tmp_path, backbones=("sam",), datasets=("chexpert",), finetune_args=("--workers", "8")), tmp_path / "grid")
    live = f"--backbone sam --dataset chexpert --root /data/chexpert {LIVE} --in-chans 1"
    assert commands(p.jobs) == [
        f"extract run {live} --protocol study --views 100 --augment study --no-tokens",
        "probe sweep --head linear --backbone sam --dataset chexpert --protocol study --epochs 100 --seed 0",
        f"finetune run --head deit --freeze all {live} --protocol study --epochs 100 --resume --seed 0 --workers 8",
        f"finetune run --head linear {live} --protocol study --epochs 100 --resume --seed 0 --workers 8",
        f"finetune run --head deit {live} --protocol study --epochs 100 --resume --seed 0 --workers 8",
    ]


def test_medfm_protocol_batches_both_frozen_heads_into_one_sweep_and_seeds_into_their_jobs(tmp_path: Path) -> None:
    p = plan(spec(tmp_path, backbones=("dinov2",), datasets=("aptos2019",), protocol="medfm", epochs=30, seeds=(0, 1)), tmp_path / "grid")
    assert commands(p.jobs)[:2] == [
        f"extract run --backbone dinov2 --dataset aptos2019 --root /data/aptos2019 {LIVE}",
        "probe sweep --head linear,deit --backbone dinov2 --dataset aptos2019 --epochs 30 --seed 0,1",
    ]
    assert p.jobs[1].cells == ("frozen-linear/dinov2/aptos2019/seed0", "frozen-linear/dinov2/aptos2019/seed1",
                               "frozen-deit/dinov2/aptos2019/seed0", "frozen-deit/dinov2/aptos2019/seed1")
    assert [j.name for j in p.jobs[2:]] == [f"finetune-unfrozen-{h}-dinov2-aptos2019-s{s}" for h in ("linear", "deit") for s in (0, 1)]


def test_resources_per_kind_change_with_their_flag_and_gpus_above_one_run_torchrun(tmp_path: Path) -> None:
    resources = parse_resources(["finetune:gpus=4", "finetune:minutes=2880"])
    assert resources["finetune"] == Resources(gpus=4, cpus=8, mem_gb=32, minutes=2880) and resources["extract"].gpus == 1
    job = plan(spec(tmp_path, backbones=("deit",), datasets=("ddsm",), scenarios=("unfrozen-linear",), resources=resources),
               tmp_path / "grid").jobs[0]
    assert job.command("/env/bin/python")[:8] == ["/env/bin/python", "-I", "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=4", "--no-python", "/env/bin/finetune"]
    for bad in ("gpu:gpus=1", "extract:gpu=1", "extract:minutes=0", "extract"):
        with pytest.raises(MedfmError, match="--resources"):
            parse_resources([bad])


@pytest.mark.parametrize(("changes", "message"), [
    ({"backbones": ("deit", "dinov9")}, "unknown backbone 'dinov9'; nearest: .*dinov2"),
    ({"datasets": ("aptos",)}, "unknown dataset 'aptos'"),
    ({"scenarios": ("frozen-knn",)}, "unknown scenario 'frozen-knn'"),
    ({"protocol": "exact"}, "--protocol must be medfm or study"),
    ({"protocol": "fast"}, "--protocol fast is now --protocol medfm"),
    ({"datasets": ("demo",)}, "use --protocol medfm for demo"),
    ({"epochs": 0}, "--epochs must be at least 1"),
])
def test_a_bad_grid_is_one_line_before_anything_is_planned(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(MedfmError, match=message):
        plan(spec(tmp_path, **changes), tmp_path / "grid")
    assert not (tmp_path / "grid").exists()


def add_runs(s: GridSpec, *cells: tuple[str, str, str, str], epochs: int | None = None) -> None:
    """Ledger rows as the stages write them: (stage, scenario, backbone, dataset), seed 0, the spec's protocol."""
    ledger = Ledger(Path(s.output) / "runs" / "results.sqlite")
    for stage, scenario, backbone, dataset in cells:
        ledger.add(RunRecord(stage=stage, scenario=scenario, backbone=backbone, dataset=dataset, head=scenario.split("-")[1],
                             config={"protocol": s.protocol, "epochs": epochs or s.epochs}, config_key=f"{stage}{scenario}",
                             cache_fingerprint=None, seed=0, primary_metric="accuracy", val_score=1.0, test_metrics={},
                             test_primary=1.0, backbone_random=False))


def test_a_rerun_plans_only_missing_cells_and_nothing_once_the_ledger_holds_them_all(tmp_path: Path) -> None:
    s = spec(tmp_path, backbones=("deit",), datasets=("aptos2019",))
    add_runs(s, ("finetune", "unfrozen-linear", "deit", "aptos2019"), ("finetune", "frozen-deit", "deit", "aptos2019"))
    add_runs(s, ("finetune", "unfrozen-deit", "deit", "aptos2019"), epochs=50)  # other settings: not this cell
    add_runs(s, ("probe", "frozen-deit", "deit", "aptos2019"))  # a cached DeiT head is not the study's live one
    assert [job.name for job in plan(s, tmp_path / "grid").jobs] == [
        "extract-deit-aptos2019", "probe-deit-aptos2019", "finetune-unfrozen-deit-deit-aptos2019-s0"]
    add_runs(s, ("probe", "frozen-linear", "deit", "aptos2019"))  # the cache's only cell: no extraction, no probe
    assert [job.name for job in plan(s, tmp_path / "grid").jobs] == ["finetune-unfrozen-deit-deit-aptos2019-s0"]
    add_runs(s, ("finetune", "unfrozen-deit", "deit", "aptos2019"))
    p = plan(s, tmp_path / "grid")
    assert p.jobs == [] and len(p.done) == 4


def test_an_extraction_this_grid_completed_is_not_planned_again_unless_its_settings_or_cache_changed(tmp_path: Path) -> None:
    s, grid = spec(tmp_path, backbones=("deit",), datasets=("aptos2019",), scenarios=("frozen-linear",)), tmp_path / "grid"
    first = plan(s, grid).jobs
    write_jobs(first, grid)
    mark(grid, "extract-deit-aptos2019", "done", rc=0)
    assert [job.name for job in plan(s, grid).jobs] == ["extract-deit-aptos2019", "probe-deit-aptos2019"]  # no cache: extract
    cache = Path(s.output) / "features" / "deit" / "aptos2019-0123456789ab.h5"
    cache.parent.mkdir(parents=True)
    cache.touch()
    again = plan(s, grid).jobs
    assert [job.name for job in again] == ["probe-deit-aptos2019"] and again[0].after == ()
    assert [job.name for job in plan(replace(s, extract_args=("--batch-size", "8")), grid).jobs][0] == "extract-deit-aptos2019"


def test_a_job_still_running_is_not_run_twice_here_and_only_ended_jobs_go_back_to_pending(tmp_path: Path) -> None:
    s, grid = spec(tmp_path, backbones=("deit",), datasets=("isic2019",), scenarios=("unfrozen-linear",)), tmp_path / "grid"
    jobs = plan(s, grid).jobs
    name = jobs[0].name
    mark(grid, name, "running", pid=os.getpid(), host=socket.gethostname(), slurm_job="")
    with pytest.raises(MedfmError, match=f"grid job {name} is still running"):
        check_not_running(grid, jobs)
    reset_ended(grid, jobs)
    assert read_state(grid, name)["state"] == "running"
    mark(grid, name, "running", pid=1, host="node7", slurm_job="123")
    with pytest.raises(MedfmError, match="host node7, SLURM job 123"):
        check_not_running(grid, jobs)
    mark(grid, name, "running", pid=2**22 + 12345, host=socket.gethostname(), slurm_job="")  # above any pid_max: gone
    check_not_running(grid, jobs)
    reset_ended(grid, jobs)
    assert read_state(grid, name) == {"state": "pending"}
    mark(grid, name, "pending", slurm_job="124")  # queued on SLURM: its executor's to keep
    reset_ended(grid, jobs)
    assert read_state(grid, name)["slurm_job"] == "124"
    mark(grid, name, "failed", rc=1)
    reset_ended(grid, jobs)
    assert read_state(grid, name) == {"state": "pending"}


def test_the_spec_round_trips_through_its_file(tmp_path: Path) -> None:
    s = spec(tmp_path, seeds=(0, 2), extract_args=("--batch-size", "8"), resources=parse_resources(["probe:cpus=2"]))
    assert GridSpec.from_json(s.to_json()) == s


def test_set_words_stand_for_their_rows_mixed_with_names_each_backbone_once_in_order(tmp_path: Path) -> None:
    """Expansion only: the 2025 and medical rows need not be registered for the spec to name them."""
    s = spec(tmp_path, backbones=("deit", "2025", "study", "timm:vit_small_patch16_224", "medical", "dinov3"))
    assert s.backbones == ("deit", *MODERN_BACKBONES, *(b for b in STUDY_BACKBONES if b != "deit"), "timm:vit_small_patch16_224",
                           *MEDICAL_BACKBONES)
    assert GridSpec.from_json(s.to_json()) == s  # the spec's file holds the rows, never a set word


def test_null_backbones_add_the_cached_cells_on_random_draws_each_with_its_own_extraction_and_sweep(tmp_path: Path) -> None:
    s = spec(tmp_path, backbones=("deit",), datasets=("aptos2019",), scenarios=("frozen-linear", "unfrozen-linear"), null=2)
    p = plan(s, tmp_path / "grid")
    assert sorted(c.key for c in p.cells if c.null) == ["frozen-linear/deit/aptos2019/seed0/null1", "frozen-linear/deit/aptos2019/seed0/null2"]
    cmds = commands(p.jobs)
    assert sum("--weights random:1" in c and c.startswith("extract") for c in cmds) == 1
    assert sum("--backbone-seed 2" in c and c.startswith("probe sweep") for c in cmds) == 1
    assert not any("--weights random" in c for c in cmds if "finetune" in c)  # only cached cells have a null
    ledger = Ledger(Path(s.output) / "runs" / "results.sqlite")
    ledger.add(RunRecord(stage="probe", scenario="frozen-linear", backbone="deit", dataset="aptos2019", head="linear",
                         config={"protocol": s.protocol, "epochs": s.epochs, "backbone_seed": 1}, config_key="null1",
                         cache_fingerprint=None, seed=0, primary_metric="accuracy", val_score=1.0, test_metrics={},
                         test_primary=1.0, backbone_random=True))
    p = plan(s, tmp_path / "grid")
    assert p.done == {"frozen-linear/deit/aptos2019/seed0/null1"}  # a null draw's run is its own cell, not the backbone's
    assert not any(job.name.endswith("-null1") for job in p.jobs)
    with pytest.raises(MedfmError, match="--null is a number of random-weight draws"):
        plan(replace(s, null=-1), tmp_path / "grid")


def test_adapter_scenarios_are_finetune_cells_of_their_own_estimated_below_full_finetuning(tmp_path: Path) -> None:
    """`--scenarios lora-linear,...` (docs/protocol.md §9): each cell one `finetune run --adapter`, never in the default grid;
    an adapter trains through the frozen backbone's activations, no weight gradients: 2 forwards an image, not 3."""
    s = spec(tmp_path, backbones=("deit",), datasets=("aptos2019",), scenarios=("lora-linear", "unfrozen-linear", "ia3-deit"))
    p = plan(s, tmp_path / "grid")
    live = f"--backbone deit --dataset aptos2019 --root /data/aptos2019 {LIVE} --protocol study --epochs 100 --resume --seed 0"
    assert commands(p.jobs) == [f"finetune run --head linear --adapter lora {live}", f"finetune run --head linear {live}",
                                f"finetune run --head deit --adapter ia3 {live}"]
    lora, full, ia3 = (p.hours[job.name] for job in p.jobs)
    assert 0 < lora < full and ia3 > lora  # the DeiT head's own passes on top
    n, flops = estimate.SPLIT_SIZES["aptos2019"], p.costs["deit"].flops
    assert lora == pytest.approx((100 * (2 * n.train + n.val) + n.test) * flops / estimate.CARD.flops_per_s / 3600)
    assert "lora-linear" not in GridSpec().scenarios
    add_runs(s, ("finetune", "lora-linear", "deit", "aptos2019"))
    assert [c.scenario for c in plan(s, tmp_path / "grid").missing] == ["unfrozen-linear", "ia3-deit"]  # a ledger row is a done cell
    with pytest.raises(MedfmError, match="unknown scenario 'lora-knn'; choose one of: frozen-linear, .*, lora-linear, lora-deit, dora"):
        plan(replace(s, scenarios=("lora-knn",)), tmp_path / "grid")

"""The `extract` command as a user types it: listings work, mistakes give one line and exit 2.

The installed console script runs once in a subprocess; every other case runs its `main` in this process.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from common.errors import MedfmError
from extract.cli import main
from tests.conftest import REPO, cli
from tests.tiny import run_main


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow  # subprocesses: an installed entry point, torchrun or a killed process
def test_the_installed_command_gives_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([cli("extract"), "run", "--backbone", "nope", "--dataset", "demo"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, "unknown backbone 'nope'", "dinov2")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["run", "--backbone", "nope", "--dataset", "demo"], ["unknown backbone 'nope'", "dinov2"]),
        (["run", "--backbone", "deit", "--dataset", "nope"], ["unknown dataset 'nope'", "imagefolder"]),
        (["run", "--backbone", "deit", "--dataset", "demo"], ["official weights for 'deit' not found", "MEDFM_WEIGHTS_DIR"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "/no/such.pth"], ["/no/such.pth does not exist"]),
        (["run", "--backbone", "deit", "--dataset", "imagefolder", "--root", "/no/such/dir", "--weights", "random"], ["/no/such/dir does not exist"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--batch-size", "0"], ["--batch-size must be", "got '0'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--batch-size", "many"], ["--batch-size must be", "got 'many'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--layers", "x"], ["--layers must be"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--device", "tpu:9"], ["unknown device 'tpu:9'"]),
        (["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--precision", "fp8"], ["--precision must be one of auto, fp32, bf16, fp16, got 'fp8'"]),
        (["run", "--dataset", "demo"], ["Missing option '--backbone'"]),
        (["nope"], ["No such command 'nope'"]),
    ],
)
def test_user_mistakes_give_one_clear_line_and_exit_2(args: list[str], fragments: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_main(main, args, monkeypatch), *fragments)
    assert not list(tmp_path.rglob("*.h5*"))  # nothing written


def test_backbones_lists_the_registry_with_parameter_counts(monkeypatch) -> None:
    code, out, err = run_main(main, ["backbones"], monkeypatch)
    assert code == 0, err
    for name, params in [("dinov2", "86.58"), ("deit", "85.80"), ("resnet152", "58.14")]:
        row = next(line for line in out.splitlines() if f" {name} " in line)
        assert params in row


def test_datasets_lists_the_registry_with_layouts(monkeypatch) -> None:
    code, out, err = run_main(main, ["datasets"], monkeypatch)
    assert code == 0, err
    assert "demo" in out and "imagefolder" in out


DEMO = ["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        ([*DEMO, "--workers", "-1"], ["--workers must be 0", "got -1"]),
        ([*DEMO, "--opt", "per_class=abc"], ["--opt per_class=abc must be a whole number"]),
        ([*DEMO, "--opt", "per_class=0"], ["--opt per_class=0 must be at least 1"]),
        ([*DEMO, "--opt", "per_class=-5"], ["--opt per_class=-5 must be at least 1"]),
        ([*DEMO, "--image-size", "70"], ["--image-size 70 does not fit deit's 16-pixel patches", "last 6 pixel", "use --image-size 64 or 80"]),
    ],
)
def test_bad_workers_demo_options_and_image_sizes_give_one_line_before_any_file(
        args: list[str], fragments: list[str], tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(*run_main(main, args, monkeypatch), *fragments)
    assert not list(tmp_path.rglob("*.h5*"))  # no partial cache left behind


def test_a_patch_grid_that_drops_pixels_is_found_and_padded_convolutions_pass() -> None:
    from extract.backbones import create_backbone
    from extract.inputs import check_image_size
    from tests.tiny import TINY_BACKBONES

    for name in ("dinov2", "resnet152", "seem"):
        overrides, _, _, _ = TINY_BACKBONES[name]
        check_image_size(create_backbone(name, "random", image_size=70, **overrides), name)  # 70 = 5 x 14; ResNet and SEEM pad
    overrides, _, _, _ = TINY_BACKBONES["dinov2"]
    with pytest.raises(MedfmError, match="--image-size 64 does not fit dinov2's 14-pixel patches: the last 8 .* use --image-size 56 or 70"):
        check_image_size(create_backbone("dinov2", "random", image_size=64, **overrides), "dinov2")


class RunsCodeOnLoad:
    def __reduce__(self) -> tuple:
        return (os.system, ("true",))


def weights_files(folder: Path) -> dict[str, Path]:
    """Files that are no weights: a plain pickle (protocol 4, as `pickle.dumps` writes), an empty .pt, a garbage
    .safetensors, and a non-checkpoint under a file name that is not UTF-8."""
    folder.mkdir()
    files = {"pickle": folder / "evil_plain.pt", "empty": folder / "empty.pt", "safetensors": folder / "garbage.safetensors",
             "latin1": folder / os.fsdecode(b"caf\xe9.pt")}
    files["pickle"].write_bytes(pickle.dumps(RunsCodeOnLoad(), protocol=4))
    files["empty"].write_bytes(b"")
    files["safetensors"].write_bytes(b"not a safetensors header" * 8)
    files["latin1"].write_bytes(b"\x00garbage")
    return files


@pytest.mark.parametrize(("kind", "fragment"), [
    ("pickle", "refusing to load"), ("empty", "the file is empty"), ("safetensors", "as safetensors"), ("latin1", "caf\\xe9.pt"),
])
def test_weights_that_cannot_load_give_one_line_and_no_library_warning(tmp_path: Path, monkeypatch, kind: str, fragment: str) -> None:
    path = weights_files(tmp_path / "w")[kind]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # torch's pickle-protocol warning would show every time, not once per process
        code, out, err = run_main(main, [*DEMO, "--weights", str(path)], monkeypatch)
    assert_one_line_error(code, out, err, fragment)
    assert not caught


def test_a_split_too_small_to_stratify_is_one_warning_line_not_a_traceback(tmp_path: Path, monkeypatch) -> None:
    """demo with 3 images per class crashed in scikit-learn; now its split is made at random and said in one line
    (the run then stops at the bad image size, before any work)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        code, out, err = run_main(main, [*DEMO, "--opt", "per_class=3", "--image-size", "70"], monkeypatch)
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in out + err and len(lines) == 2, err
    assert lines[0].startswith("warning: 12 images are too few to stratify the split by label") and "val has no image of" in lines[0]
    assert lines[1].startswith("error: --image-size 70 does not fit")


REGISTRIES = """
from extract.backbones import list_backbones
from extract.datasets import list_datasets
from extract.names import BACKBONES, DATASETS
from probe.heads import list_heads
from training.names import HEADS
assert BACKBONES == tuple(spec.name for spec in list_backbones()), [spec.name for spec in list_backbones()]
assert DATASETS == tuple(entry.name for entry in list_datasets()), [entry.name for entry in list_datasets()]
assert HEADS == tuple(spec.name for spec in list_heads()), [spec.name for spec in list_heads()]
"""


def test_the_names_checked_before_torch_loads_are_the_registries() -> None:
    """In a fresh process: tests register entries of their own (`tiny-deit`, `killable-demo`) in this one."""
    proc = subprocess.run([sys.executable, "-c", REGISTRIES], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


TYPOS = """
import sys
from extract.cli import main as extract
from finetune.cli import main as finetune
from probe.cli import main as probe
for main, args in [(extract, ["run", "--backbone", "sam3", "--dataset", "demo"]), (extract, ["run", "--backbone", "sam", "--dataset", "aptos"]),
                   (finetune, ["run", "--backbone", "sam3", "--dataset", "demo"]), (finetune, ["run", "--backbone", "sam", "--dataset", "demo", "--head", "mlp"]),
                   (probe, ["run", "--head", "mlp"]), (probe, ["sweep", "--head", "linear,mlp"])]:
    sys.argv = ["prog", *args]
    try:
        main()
    except SystemExit as exit_:
        assert exit_.code == 2, (args, exit_.code)
loaded = [m for m in ("torch", "timm", "open_clip", "h5py") if m in sys.modules]
assert "torch" not in sys.modules, loaded
print("no torch")
"""


def test_a_mistyped_backbone_dataset_or_head_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """`extract run --backbone sam3` answers in a fraction of a second: the names are checked before the models load."""
    proc = subprocess.run([sys.executable, "-c", TYPOS], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "no torch", proc.stderr
    errors = proc.stderr.strip().splitlines()
    assert errors[0] == ("error: unknown backbone 'sam3'; choose one of: deit, dino, dinov2, resnet152, blip, openclip, sam, seem, "
                         "dinov3, siglip2, sam2, radio, pe_core, rad_dino, medsiglip, biomedclip (see `extract backbones`)")
    assert len(errors) == 6 and all(e.startswith("error: unknown ") for e in errors)


def commands() -> list[tuple[str, str, object]]:
    import typer.main

    import cache.cli
    import extract.cli
    import finetune.cli
    import grid.cli
    import probe.cli

    return [(module.__name__.split(".")[0], name, command)
            for module in (extract.cli, probe.cli, finetune.cli, cache.cli, grid.cli)
            for name, command in typer.main.get_command(module.app).commands.items()]


def test_every_option_of_every_command_shows_its_default_in_help(monkeypatch) -> None:
    """Each option's help ends in `[default: ...]` (typer's show_default), never a `[default: ...]` written into the help
    text, which the rich help renders as markup and drops."""
    import typer

    missing, in_text = [], []
    for program, name, command in commands():
        ctx = typer.Context(command, info_name=name)
        for param in command.params:
            if param.name == "help" or param.required or getattr(param, "hidden", False):
                continue
            shown = param.get_help_record(ctx)[1] if param.param_type_name == "option" else str(param.show_default)
            if "default:" not in shown and not isinstance(param.show_default, str):
                missing.append(f"{program} {name} {param.name}")
            if "[default" in (getattr(param, "help", None) or ""):
                in_text.append(f"{program} {name} {param.name}")
    assert missing == [] and in_text == []
    monkeypatch.setenv("COLUMNS", "400")
    code, out, _ = run_main(main, ["run", "--help"], monkeypatch)
    assert code == 0 and "[default: (the backbone's, 224)]" in out and "[default: auto]" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "aptos2019"], "error: dataset 'aptos2019' needs --root PATH (`extract datasets` shows the layout it expects there)"),
    (["--dataset", "imagefolder", "--root", "/nonexistent/medfm"], "error: --root /nonexistent/medfm does not exist; dataset 'imagefolder'"),
])
def test_a_missing_root_is_one_line_before_torch_loads(args: list[str], message: str) -> None:
    """In a fresh process, the check answers before torch is imported (a user's typo costs no model load)."""
    script = ("import sys; from extract.cli import main; sys.argv = ['extract', 'run', '--backbone', 'deit', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "False 2" and lines[-2].startswith(message)


def test_a_csv_path_outside_its_folder_is_one_line_before_torch_loads(tmp_path: Path) -> None:
    """The dataset's layout is read before the models load: a CSV naming a file outside its folder answers in a second."""
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "labels.csv").write_text("path,label\n../outside.png,a\nimg/1.png,b\n")
    script = ("import sys; from extract.cli import main; sys.argv = ['extract', 'run', '--backbone', 'deit', *sys.argv[1:]]\n"
              "try:\n    main()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script, "--dataset", "csv", "--root", str(tmp_path / "root")], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "False 2" and "names ../outside.png, outside" in lines[-2]


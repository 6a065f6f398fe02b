"""The cache changes the cost, not the result: a frozen linear head trained from K augmented cached views equals
the same head trained online (finetune --freeze all) on freshly augmented images, when K is the number of epochs.

Both sides draw image i of epoch/view v from `view_seed(seed, v, id)`, start the head from the same seed and
take one batch per epoch (the whole train split, so batch order cannot matter); what is left to differ is
float summation order and torch's AdamW against the probe's stacked AdamW.

Both sides share medfm's transform, so the views are also held against an independent reference: the study's train
augmentation written in this file from the official code's parameters, whose features must equal the cached views, and
a wrong augmentation patched into medfm's transform must break that equality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from cache.schema import view_group
from cache.store import CacheReader, verify
from common.errors import MedfmError
from extract.backbones import create_backbone
from extract.datasets import get_dataset
from extract.runner import ExtractConfig, extract
from extract.transforms import view_seed
from finetune.train import FinetuneConfig, finetune
from probe.config import TrainConfig
from probe.data import FeatureSource
from probe.train import train_head
from tests.tiny import QUIET, TINY_SIZE, TINY_VIT_1

EPOCHS, PER_CLASS, SEED = 3, 8, 0
COMMON = dict(backbone="deit", dataset="demo", weights="random", image_size=TINY_SIZE, workers=0, device="cpu",
              overrides=TINY_VIT_1, dataset_options={"per_class": PER_CLASS})


def cached_head(out: Path, augment_seed: int = SEED, view_shift: int = 0) -> tuple[torch.Tensor, float, int]:
    cache = extract(ExtractConfig(**COMMON, out=out, tokens=False, views=EPOCHS, augment="study", augment_seed=augment_seed), QUIET)
    with CacheReader(cache.path) as reader:
        n_train = len(reader.ids("train"))
        source = FeatureSource(reader, "pooled", n_train, views=EPOCHS)
        if view_shift:  # the wrong view for each epoch: the test must notice
            source.train_groups = source.train_groups[view_shift:] + source.train_groups[:view_shift]
        config = TrainConfig(lr=1e-2, epochs=EPOCHS, batch_size=n_train, views=EPOCHS, seed=SEED)
        result = train_head(config, source, reader.task, torch.device("cpu"))
    return result.state_dict["linear.weight"], result.test_metrics["accuracy"], n_train


def online_head(out: Path, n_train: int) -> tuple[torch.Tensor, float]:
    result = finetune(FinetuneConfig(**COMMON, out=out, head="linear", freeze="all", epochs=EPOCHS, batch_size=n_train,
                                     lr=1e-2, seed=SEED, augment=True), QUIET)
    best = torch.load(result.run_dir / "best.pt", weights_only=True)
    return best["head.linear.weight"], result.test_metrics["accuracy"]


def test_a_head_on_cached_augmented_views_equals_the_head_trained_online(tmp_path: Path) -> None:
    weight, test, n_train = cached_head(tmp_path / "cache")
    online, online_test = online_head(tmp_path / "runs", n_train)
    torch.testing.assert_close(weight, online, rtol=1e-4, atol=1e-5)
    assert test == online_test


@pytest.mark.parametrize("change", ["augment_seed", "view"])
def test_other_draws_give_another_head(tmp_path: Path, change: str) -> None:
    """The equality above is no accident of augmentation doing nothing: other seeds or views change the head."""
    reference, _, _ = cached_head(tmp_path / "a")
    other, _, _ = cached_head(tmp_path / "b", **({"augment_seed": SEED + 1} if change == "augment_seed" else {"view_shift": 1}))
    assert not torch.allclose(reference, other, rtol=1e-3, atol=1e-4)


def test_views_are_seeded_per_image_and_resume_and_verify(tmp_path: Path) -> None:
    """Each augmented view is its own group: different draws from the eval view and from each other, checksummed."""
    cache = extract(ExtractConfig(**COMMON, out=tmp_path, tokens=False, views=2, augment="study"), QUIET)
    with CacheReader(cache.path) as reader:
        assert reader.meta.views == 2 and reader.groups == ["train", "val", "test", "train+view0", "train+view1"]
        eval_view, v0, v1 = (reader.features(g) for g in ("train", "train+view0", "train+view1"))
        assert not np.allclose(eval_view, v0) and not np.allclose(v0, v1)
        assert reader.ids("train+view1").tolist() == reader.ids("train").tolist()
    assert verify(cache.path) == []


@pytest.mark.parametrize(("views", "augment", "message"), [
    (2, "none", "--views 2 needs --augment study"), (-1, "study", "--views must be 0"), (1, "heavy", "--augment must be one of"),
])
def test_bad_view_settings_are_one_line_before_any_file(tmp_path: Path, views: int, augment: str, message: str) -> None:
    with pytest.raises(MedfmError, match=message):
        extract(ExtractConfig(**COMMON, out=tmp_path, views=views, augment=augment), QUIET)
    assert not any(tmp_path.rglob("*.h5*"))


def test_a_probe_asking_for_more_views_than_the_cache_holds_is_refused(tmp_path: Path) -> None:
    cache = extract(ExtractConfig(**COMMON, out=tmp_path, tokens=False), QUIET)
    with CacheReader(cache.path) as reader, pytest.raises(MedfmError, match="holds 0 augmented train views"):
        FeatureSource(reader, "pooled", 8, views=3)


@pytest.mark.parametrize(("args", "message"), [
    (["--views", "0", "--augment", "study"], "--views must be at least 1, got 0; leave it out"),
    (["--views", "3"], "--views 3 needs --augment study"),
    (["--protocol", "exact"], "--protocol must be medfm or study"),
    (["--protocol", "study"], "--protocol study runs on the study's inputs: add --norm study --interpolation bilinear"),
])
def test_bad_view_and_protocol_flags_are_one_line_and_exit_2(tmp_path: Path, monkeypatch, args: list[str], message: str) -> None:
    from extract.cli import main
    from tests.tiny import run_main

    code, _, err = run_main(main, ["run", "--backbone", "deit", "--dataset", "demo", "--weights", "random", "--out", str(tmp_path), *args],
                            monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not any(tmp_path.rglob("*.h5*"))


def official_train_pipeline(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """The study's train augmentation written here from the official code's parameters (docs/protocol.md §3), not from
    medfm's transform: Resize((S/0.875, S/0.875)), CenterCrop(S), RandomResizedCrop(S, scale=(0.8, 1.2)), vertical then
    horizontal flips (p=0.5), ColorJitter(0.2, 0.2, 0.1, 0.1) with p=0.8, ToTensor, Normalize."""
    side = round(size / 0.875)
    return T.Compose([
        T.Resize((side, side), interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
        T.RandomResizedCrop(size, scale=(0.8, 1.2)), T.RandomVerticalFlip(0.5), T.RandomHorizontalFlip(0.5),
        T.RandomApply([T.ColorJitter(0.2, 0.2, 0.1, 0.1)], p=0.8), T.ToTensor(), T.Normalize(mean, std),
    ])


def reference_views(cache: Path, views: int) -> dict[str, np.ndarray]:
    """Each cached view's pooled features recomputed from the images through the independent pipeline above, image i of
    view v drawn from torch's generator seeded with `view_seed(seed, v, id_i)` (the documented draw, docs/architecture.md)."""
    with CacheReader(cache) as reader:
        ids, transform = reader.ids("train").tolist(), reader.meta.transform
    source = get_dataset("demo", None, per_class=PER_CLASS)
    model = create_backbone("deit", "random", image_size=TINY_SIZE, **TINY_VIT_1)
    pipeline = official_train_pipeline(TINY_SIZE, tuple(transform["mean"]), tuple(transform["std"]))
    images = dict(zip(source.splits["train"].ids, source.splits["train"].images, strict=True))
    out = {}
    for v in range(views):
        batch = []
        for image_id in ids:
            torch.manual_seed(view_seed(SEED, v, image_id))
            batch.append(pipeline(source.load_image(images[image_id]).convert("RGB")))
        with torch.no_grad():
            out[view_group(v)] = model(torch.stack(batch)).pooled.numpy()
    return out


def cached_views(out: Path, views: int = 2) -> tuple[Path, dict[str, np.ndarray]]:
    cache = extract(ExtractConfig(**COMMON, out=out, tokens=False, views=views, augment="study", augment_seed=SEED,
                                  interpolation="bilinear"), QUIET).path
    with CacheReader(cache) as reader:
        return cache, {view_group(v): reader.features(view_group(v)) for v in range(views)}


def test_the_cached_views_are_the_studys_augmentation_computed_independently(tmp_path: Path) -> None:
    cache, cached = cached_views(tmp_path)
    reference = reference_views(cache, 2)
    for group, features in reference.items():
        np.testing.assert_allclose(cached[group], features, rtol=1e-4, atol=1e-5, err_msg=group)


def test_a_wrong_augmentation_in_the_projects_transform_fails_the_reference(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The negative control: a horizontal flip that never happens, patched into medfm's transform, is caught."""
    import extract.transforms

    real = T.RandomHorizontalFlip
    monkeypatch.setattr(extract.transforms.T, "RandomHorizontalFlip", lambda p=0.5: real(p=0.0))
    cache, cached = cached_views(tmp_path)
    monkeypatch.setattr(extract.transforms.T, "RandomHorizontalFlip", real)
    reference = reference_views(cache, 2)
    assert not all(np.allclose(cached[g], reference[g], rtol=1e-4, atol=1e-5) for g in reference)

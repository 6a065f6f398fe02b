"""The written contract between stages: tasks with a checked metric, feature keys, and the cache meta."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cache.schema import BackboneInfo, CacheMeta, DatasetInfo, Task, feature_key, resolve_layer
from common.errors import MedfmError
from tests.tiny import MULTICLASS


def test_an_unknown_metric_is_refused_where_the_task_is_declared_in_one_line():
    with pytest.raises(MedfmError) as err:
        Task("multiclass", ("a", "b"), "kappa")
    assert "kappa" in str(err.value) and "quadratic_kappa" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedfmError, match="mean_roc_auc"):
        Task("binary", ("a", "b"), "mean_roc_auc")  # a real metric, of another kind
    assert Task("multilabel", ("x",)).primary_metric == "mean_roc_auc"  # empty: the kind's default


def test_a_dataset_module_declaring_an_unknown_metric_fails_at_import(tmp_path):
    """The study's dataset modules declare their Task at import; a typo there stops the import itself."""
    module = tmp_path / "typo_dataset.py"
    module.write_text(
        "from extract.datasets import DatasetEntry, register\n"
        "from extract.datasets.base import Task\n"
        "TASK = Task('multiclass', ('a', 'b'), 'macro_recal')\n"
    )
    spec = importlib.util.spec_from_file_location("typo_dataset", module)
    with pytest.raises(MedfmError, match="metric 'macro_recal' is not defined for multiclass tasks; choose one of"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_the_study_datasets_declare_their_metric_at_import():
    from extract.datasets import aptos, chexpert, ddsm, isic

    got = [m.primary_metric for m in (aptos.TASK, isic.TASK, chexpert.TASK, ddsm.DDSM_TASK)]
    assert got == ["quadratic_kappa", "macro_recall", "mean_roc_auc", "roc_auc"]  # the study's metric per dataset


@pytest.mark.parametrize(("layer", "name"), [(None, "pooled"), (-1, "pooled"), (11, "pooled"), (-4, "pooled@8"), (8, "pooled@8"), (0, "pooled@0")])
def test_feature_keys_resolve_negative_layers_against_the_block_count(layer, name):
    assert feature_key("pooled", layer, 12) == name
    assert feature_key("tokens", layer, 12) == name.replace("pooled", "tokens")


@pytest.mark.parametrize("layer", [12, -13])
def test_a_layer_outside_the_backbone_is_one_clear_error(layer):
    with pytest.raises(MedfmError, match="out of range for a backbone of 12 blocks"):
        resolve_layer(layer, 12)


def meta(**changes) -> CacheMeta:
    base = dict(backbone=BackboneInfo("deit", "ImNet-1k-Sup", False, {"kind": "pretrained", "file": "d.pth", "sha256": "ab"}),
                dataset=DatasetInfo("demo", {"per_class": 3}, "m" * 64), task=MULTICLASS, layers=(8, 11), num_layers=12)
    return CacheMeta(**{**base, **changes})


def test_cache_meta_round_trips_through_json_and_names_the_stored_blocks():
    original = meta()
    again = CacheMeta.from_json(original.to_json())
    assert again == original
    assert again.feature("pooled", -4) == "pooled@8" and again.feature("tokens") == "tokens"
    with pytest.raises(MedfmError, match="re-extract with --layers"):
        again.feature("pooled", -3)  # block 9: a valid index this cache did not store


def test_a_meta_without_a_task_is_one_clear_error():
    data = json.loads(meta().to_json())
    del data["task"]
    with pytest.raises(MedfmError, match="lacks the backbone, dataset, task or layer description"):
        CacheMeta.from_json(json.dumps(data))
    with pytest.raises(MedfmError, match="including the last"):
        meta(layers=(4,))


EXTRACTED = {"backbone": "deit", "weights": {"kind": "pretrained", "sha256": "ab"}, "overrides": {}, "decoder": 1,
             "transform": {"size": 224, "resize": 256, "mean": [0.1], "std": [0.2], "interpolation": "bicubic", "channels": 3},
             "norm": {"kind": "dataset", "images": 500}, "dataset": "demo", "root": "/a", "dataset_options": {"per_class": 3},
             "manifest_hash": "m", "layers": [11], "tokens": True, "token_dtype": "float16", "precision": "fp32", "views": None,
             "protocol": "medfm"}


@pytest.mark.parametrize("change", [
    {"dataset": "aptos2019", "root": "/b", "dataset_options": {}, "manifest_hash": "n", "views": {"count": 2}, "layers": [8, 11],
     "tokens": False, "corrupt": {"kind": "gaussian_noise", "severity": 3}},
    {"transform": {**EXTRACTED["transform"], "mean": [0.5], "std": [0.3]}, "norm": {"kind": "dataset", "images": 20}},
])
def test_feature_settings_ignore_which_data_was_read_and_its_own_normalisation_statistics(change):
    from cache.schema import feature_settings

    assert feature_settings({**EXTRACTED, **change}) == feature_settings(EXTRACTED)


@pytest.mark.parametrize("change", [
    {"backbone": "dino"}, {"weights": {"kind": "random"}}, {"overrides": {"depth": 2}}, {"decoder": 2}, {"precision": "bfloat16"},
    {"protocol": "study"}, {"token_dtype": "float32"}, {"norm": {"kind": "model"}},
    {"transform": {**EXTRACTED["transform"], "size": 112}}, {"transform": {**EXTRACTED["transform"], "interpolation": "bilinear"}},
    {"transform": {**EXTRACTED["transform"], "channels": 1}},
])
def test_feature_settings_keep_everything_that_changes_the_features(change):
    from cache.schema import feature_settings

    assert feature_settings({**EXTRACTED, **change}) != feature_settings(EXTRACTED)


def test_with_the_backbones_own_normalisation_its_values_count():
    from cache.schema import feature_settings

    model = {**EXTRACTED, "norm": {"kind": "model"}}
    assert feature_settings({**model, "transform": {**EXTRACTED["transform"], "mean": [0.5]}}) != feature_settings(model)

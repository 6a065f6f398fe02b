"""The study's facts (Huix et al., WACV 2024, docs/protocol.md): its backbones, its datasets, and which datasets it fed
as one channel. One list each, read by the grid, the report, the name checks and the Makefile
(`python -m common.study backbones|datasets` prints them space-separated)."""

from __future__ import annotations

import sys

IMAGENET_BACKBONES = ("deit", "dino", "resnet152")  # ImageNet pretraining, the study's baselines
FOUNDATION_BACKBONES = ("sam", "seem", "dinov2", "openclip", "blip")  # the natural-domain foundation models it asks about
STUDY_BACKBONES = IMAGENET_BACKBONES + FOUNDATION_BACKBONES
STUDY_DATASETS = ("aptos2019", "isic2019", "ddsm", "chexpert")
GRAYSCALE_DATASETS = ("ddsm", "chexpert")  # fed as one channel (--in-chans 1)

# the study's question asked of later models: named registry rows (docs/backbones.md), grouped as the grid and the
# report take them (`grid run --backbones 2025`)
MODERN_BACKBONES = ("dinov3", "siglip2", "sam2", "radio", "pe_core")  # natural-domain foundation models of 2025
MEDICAL_BACKBONES = ("rad_dino", "medsiglip", "biomedclip")  # medical-domain models, the references to beat
BACKBONE_SETS = {"study": STUDY_BACKBONES, "2025": MODERN_BACKBONES, "medical": MEDICAL_BACKBONES}

if __name__ == "__main__":
    print(" ".join({"backbones": STUDY_BACKBONES, "datasets": STUDY_DATASETS, **BACKBONE_SETS}[sys.argv[1]]))

"""Images -> features: backbones, datasets, transforms and the extraction loop."""

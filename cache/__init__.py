"""The HDF5 feature store: the one contract between extraction and probing."""

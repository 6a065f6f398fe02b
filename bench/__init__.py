"""Benchmarks that print ratios measured side by side (`make bench`, or `python -m bench [name ...]`)."""

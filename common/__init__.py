"""Helpers every stage shares (the error type, the CLI wrapper, device and output locations, the safe weights loader).

`common` imports no project package, so extract, cache, probe and finetune may all import it.
"""

"""Weights and tokenizers: the one loading path (loading.py), the embedded model, tokenizer fixes, adapters (LoRA
and its variants), what a run saved (trained.py), merging an adapter into full-precision weights, and the memory
estimate.

May import: config, runs.
"""

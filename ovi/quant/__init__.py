"""Quantised checkpoints: FP8 and GGUF converters, loaders and compute layers."""

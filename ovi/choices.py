"""The choices the engine accepts and the nodes offer, in one place.

Both ``ovi/`` (which validates them) and ``nodes/`` (which lists them in ComfyUI's combo boxes) import these
tuples, so a value added here shows up in both. This module imports nothing: the pack imports it at ComfyUI's
start, where importing torch or the engine would cost seconds.
"""

from __future__ import annotations

MEMORY_MODES = ("auto", "all_gpu", "offload", "block_swap")  # ovi.engine documents each mode
ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "sage")  # ovi.attention.make_attention resolves them
SOLVERS = ("unipc", "euler", "dpm++")  # ovi.sampling.schedules.make_schedule builds them
GGUF_TARGETS = ("gguf-q8_0", "gguf-q6_k", "gguf-q5_k", "gguf-q4_k", "gguf-f16", "gguf-bf16")
CONVERT_TARGETS = ("fp8",) + GGUF_TARGETS  # `python -m ovi convert --to` and the OviConvertModel node
KNOWN_MODES = ("clean", "renoise")  # how known video / audio is held (ovi.sampling.known documents both)

# The official inference config's negative prompts (the engine's own defaults are empty, as in the official
# generate()); the CLI and the sampler node start from these.
VIDEO_NEGATIVE_PROMPT = "jitter, bad hands, blur, distortion"
AUDIO_NEGATIVE_PROMPT = "robotic, muffled, echo, distorted"

__all__ = ["MEMORY_MODES", "ATTENTION_BACKENDS", "SOLVERS", "GGUF_TARGETS", "CONVERT_TARGETS", "KNOWN_MODES",
           "VIDEO_NEGATIVE_PROMPT", "AUDIO_NEGATIVE_PROMPT"]

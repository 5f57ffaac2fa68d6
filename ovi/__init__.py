"""Ovi engine: twin-backbone audio-video diffusion, its text encoder, VAEs and vocoder.

Importable without ComfyUI; every module here uses relative imports only.
"""

__version__ = "0.1.0"

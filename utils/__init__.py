"""ComfyUI-side helpers of the node pack: model folders, type conversion, progress/interrupt, memory management.
Modules that import ComfyUI or torch at the top are only imported from inside node methods."""

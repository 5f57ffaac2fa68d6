"""ComfyUI entry point of the Ovi node pack.

Importing this module must stay cheap: the engine (torch models, sentencepiece, gguf) is imported only when a
node runs, so a missing optional dependency shows up as a clear error on that node instead of vanished nodes.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .utils.folders import register as _register_folders

    _register_folders()
else:
    # Imported as a lone file (pytest collects the repository root as a package when its folder name is not a
    # valid identifier); ComfyUI always imports the folder as a package, so there is nothing to register here.
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]

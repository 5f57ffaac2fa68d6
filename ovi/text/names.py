"""umT5 tensor names in the other tools' conventions, mapped from our official (``.pth``) keys.

Every convention renames modules one to one: a few top-level modules, and the modules of each encoder block
under a numbered prefix (``blocks.3.attn.q`` -> ``encoder.block.3.layer.0.SelfAttention.q``); parameter
names (``weight``, ``bias``) are kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

_OFFICIAL_BLOCKS = "blocks"


@dataclass(frozen=True)
class KeyNaming:
    name: str                   # the convention, for error messages
    block_prefix: str           # their numbered block prefix, e.g. "encoder.block"
    block: Mapping[str, str]    # official module inside a block -> theirs
    top: Mapping[str, str]      # official top-level module -> theirs
    _block_inv: dict = field(init=False, repr=False, compare=False)
    _top_inv: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_block_inv", {v: k for k, v in self.block.items()})
        object.__setattr__(self, "_top_inv", {v: k for k, v in self.top.items()})

    def from_official(self, key: str) -> str:
        """``blocks.3.attn.q.weight`` -> their name; KeyError for a key that is not a umT5 encoder tensor."""
        out = _rename(key, _OFFICIAL_BLOCKS, self.block_prefix, self.block, self.top)
        if out is None:
            raise KeyError(f"not a umT5 encoder key: {key!r}")
        return out

    def to_official(self, key: str) -> str:
        """Their name -> the official key; KeyError for a name outside this convention."""
        out = _rename(key, self.block_prefix, _OFFICIAL_BLOCKS, self._block_inv, self._top_inv)
        if out is None:
            raise KeyError(f"not a {self.name} umT5 name: {key!r}")
        return out


def _rename(key: str, prefix: str, new_prefix: str, block: Mapping[str, str], top: Mapping[str, str]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    m = re.fullmatch(rf"{re.escape(prefix)}\.(\d+)\.(.+)", module)
    if m and m.group(2) in block:
        return f"{new_prefix}.{m.group(1)}.{block[m.group(2)]}.{param}"
    return None


# ComfyUI / Comfy-Org files (and transformers' UMT5EncoderModel)
COMFY = KeyNaming("ComfyUI", "encoder.block", {
    "norm1": "layer.0.layer_norm",
    "attn.q": "layer.0.SelfAttention.q",
    "attn.k": "layer.0.SelfAttention.k",
    "attn.v": "layer.0.SelfAttention.v",
    "attn.o": "layer.0.SelfAttention.o",
    "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
    "norm2": "layer.1.layer_norm",
    "ffn.gate.0": "layer.1.DenseReluDense.wi_0",  # the GELU branch
    "ffn.fc1": "layer.1.DenseReluDense.wi_1",  # the linear multiplier
    "ffn.fc2": "layer.1.DenseReluDense.wo",
}, {"token_embedding": "shared", "norm": "encoder.final_layer_norm"})

# llama.cpp's T5 encoder names, as in the published umt5-xxl-encoder GGUF files
LLAMA_CPP = KeyNaming("llama.cpp T5", "enc.blk", {
    "norm1": "attn_norm", "attn.q": "attn_q", "attn.k": "attn_k", "attn.v": "attn_v", "attn.o": "attn_o",
    "pos_embedding.embedding": "attn_rel_b", "norm2": "ffn_norm", "ffn.gate.0": "ffn_gate", "ffn.fc1": "ffn_up",
    "ffn.fc2": "ffn_down",
}, {"token_embedding": "token_embd", "norm": "enc.output_norm"})

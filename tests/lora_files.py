"""LoRA files for the tests, written by the tests: each tensor of a ``Lora`` is recorded with what it does to which
fusion parameter, so a test can merge by hand (``hand_merge``: ``W + strength * alpha / rank * up @ down``) what
the loader must do by itself. ``convention(name)`` makes one LoRA per key convention the loader reads."""

from __future__ import annotations

import zlib

import torch
from safetensors.torch import save_file

RANK = 4
ALPHA = 2.0
V, A = "video_model.", "audio_model."


class Lora:
    """Tensors of one LoRA file, and what each does to which fusion parameter (for the hand merge)."""

    def __init__(self, seed=0):
        self.tensors: dict[str, torch.Tensor] = {}
        self.effects: list[tuple[str, str, torch.Tensor]] = []  # (param, branch, unscaled delta)
        self.g = torch.Generator().manual_seed(seed)

    def pair(self, stem, param, out_in, *, down=".lora_down.weight", up=".lora_up.weight", alpha=ALPHA,
             kernel=(), rank=RANK):
        out, inp = out_in
        d = 0.3 * torch.randn(rank, inp, *kernel, generator=self.g)
        u = 0.3 * torch.randn(out, rank, *([1] * len(kernel)), generator=self.g)
        self.tensors[stem + down], self.tensors[stem + up] = d, u
        if alpha is not None:
            self.tensors[stem + ".alpha"] = torch.tensor(alpha)
        scale = (alpha / rank) if alpha is not None else 1.0
        delta = (u.flatten(1) @ d.flatten(1)).reshape(out, inp, *kernel) * scale
        self.effects.append((param, param.split(".")[0].removesuffix("_model"), delta))
        return self

    def diff(self, key, param, shape):
        t = 0.05 * torch.randn(*shape, generator=self.g)
        self.tensors[key] = t
        self.effects.append((param, param.split(".")[0].removesuffix("_model"), t))
        return self

    def save(self, path):
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(path))
        return path


@torch.no_grad()
def hand_merge(params, loras_and_strengths):
    """W + strength * alpha / rank * up @ down (and W + strength * diff), written out in the test, on ``params``
    ({name: tensor}: a model's ``named_parameters()`` or a float32 state dict), in place; returns ``params``."""
    for lora, s in loras_and_strengths:
        for param, branch, delta in lora.effects:
            w = s.video if branch == "video" else s.audio
            params[param].add_(w * delta)
    return params


DIM, FFN, HEAD_OUT, FREQ = 256, 288, 192, 256


def convention(name):
    L = Lora(seed=zlib.crc32(name.encode()) % 1000)  # stable across processes (str hash is salted)
    if name == "kohya":
        L.pair("lora_unet_blocks_0_self_attn_q", V + "blocks.0.self_attn.q.weight", (DIM, DIM))
        L.pair("lora_unet_blocks_1_ffn_0", V + "blocks.1.ffn.0.weight", (FFN, DIM))
        L.pair("lora_unet_blocks_0_cross_attn_o", V + "blocks.0.cross_attn.o.weight", (DIM, DIM))
        L.pair("lora_unet_head_head", V + "head.head.weight", (HEAD_OUT, DIM))
    elif name == "wan_fun":
        L.pair("lora_unet__blocks_0_cross_attn_k", V + "blocks.0.cross_attn.k.weight", (DIM, DIM))
        L.pair("lora_unet__blocks_1_ffn_2", V + "blocks.1.ffn.2.weight", (DIM, FFN))
    elif name == "comfy":
        L.pair("diffusion_model.blocks.0.self_attn.k", V + "blocks.0.self_attn.k.weight", (DIM, DIM))
        L.pair("diffusion_model.time_embedding.0", V + "time_embedding.0.weight", (DIM, FREQ))
        L.pair("diffusion_model.blocks.1.cross_attn.v", V + "blocks.1.cross_attn.v.weight", (DIM, DIM), alpha=None)
    elif name == "peft_diffusers":
        kw = dict(down=".lora_A.weight", up=".lora_B.weight", alpha=None)
        L.pair("transformer.blocks.0.attn1.to_q", V + "blocks.0.self_attn.q.weight", (DIM, DIM), **kw)
        L.pair("transformer.blocks.0.attn2.to_out.0", V + "blocks.0.cross_attn.o.weight", (DIM, DIM), **kw)
        L.pair("transformer.blocks.1.ffn.net.0.proj", V + "blocks.1.ffn.0.weight", (FFN, DIM), **kw)
        L.pair("transformer.proj_out", V + "head.head.weight", (HEAD_OUT, DIM), **kw)
        L.pair("transformer.condition_embedder.time_proj", V + "time_projection.1.weight", (6 * DIM, DIM), **kw)
        L.pair("transformer.condition_embedder.time_embedder.linear_2", V + "time_embedding.2.weight", (DIM, DIM),
               **kw)
        L.diff("transformer.blocks.0.norm2.diff", V + "blocks.0.norm3.weight", (DIM,))  # diffusers' norm2 = Wan norm3
        L.diff("transformer.blocks.1.scale_shift_table.diff", V + "blocks.1.modulation.modulation", (1, 6, DIM))
        L.diff("transformer.scale_shift_table.diff", V + "head.modulation", (1, 2, DIM))
    elif name == "peft_bare":
        kw = dict(down=".lora_A.weight", up=".lora_B.weight")
        L.pair("blocks.0.self_attn.v", V + "blocks.0.self_attn.v.weight", (DIM, DIM), **kw)
        L.pair("blocks.1.cross_attn.q", V + "blocks.1.cross_attn.q.weight", (DIM, DIM), **kw)
    elif name == "ovi":
        L.pair("video_model.blocks.0.cross_attn.k_fusion", V + "blocks.0.cross_attn.k_fusion.weight", (DIM, DIM))
        L.pair("audio_model.blocks.1.self_attn.q", A + "blocks.1.self_attn.q.weight", (DIM, DIM))
        L.pair("audio_model.blocks.0.ffn.2", A + "blocks.0.ffn.2.weight", (DIM, FFN))
    elif name == "ovi_kohya":
        L.pair("lora_unet_audio_model_blocks_0_cross_attn_v_fusion", A + "blocks.0.cross_attn.v_fusion.weight",
               (DIM, DIM))
        L.pair("lora_unet_video_model_blocks_1_self_attn_o", V + "blocks.1.self_attn.o.weight", (DIM, DIM))
    else:
        raise KeyError(name)
    return L


CONVENTIONS = {"kohya": "kohya/musubi", "wan_fun": "kohya/musubi", "comfy": "ComfyUI/Wan",
               "peft_diffusers": "PEFT", "peft_bare": "PEFT", "ovi": "ComfyUI/Wan", "ovi_kohya": "kohya/musubi"}

"""Tiny umT5 encoder + sentencepiece tokenizer in the real file layouts, for CPU tests.

Writes, under ``out_dir``:
* ``Wan2.2-TI2V-5B/models_t5_umt5-xxl-enc-bf16.pth``: official names, bf16, ``torch.save`` of a plain state dict;
* ``Wan2.2-TI2V-5B/google/umt5-xxl/spiece.model``: the tokenizer as the official download ships it;
* ``text_encoders/umt5_xxl_fp16.safetensors``: ComfyUI names, fp16, with the ``spiece_model`` uint8 tensor;
* ``text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors``: ComfyUI scaled fp8 (``scaled_fp8`` marker,
  fp8 Linear weights with float32 ``scale_weight``), with ``spiece_model``.

The weights are bf16 values that fp16 also represents exactly, so the bf16 and fp16 files hold the same model.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from ...text.checkpoint import comfy_key
from ...text.umt5 import UMT5Config, UMT5Encoder

TAGS = ("<S>", "<E>", "<AUDCAP>", "<ENDAUDCAP>")

# Training text for the tiny sentencepiece model: prompts in the style Ovi is used with.
CORPUS = """\
A man walks on the beach at sunset while waves crash against the rocks.
A woman in a red coat stands on a busy city street and says hello to a friend.
Two children laugh and run across a green field with a small brown dog.
An old fisherman repairs his net on a wooden pier as seagulls call overhead.
A chef in a white jacket cooks vegetables in a hot pan in a crowded kitchen.
A young musician plays a quiet melody on a piano in an empty concert hall.
The camera slowly moves forward through a dark forest full of tall pine trees.
A cat sleeps on a warm windowsill while rain falls softly outside the glass.
A teacher writes on the board and turns to speak to the students in the room.
A reporter stands in front of a stadium and describes the noise of the crowd.
Rain drums on a metal roof while thunder rolls in the distance at night.
A train passes through a snowy valley with a long whistle and the sound of wheels.
A woman says that she cannot believe the news and covers her mouth with her hands.
A man in a suit looks at the camera and speaks calmly about the future of the city.
Birds sing in the morning light as a farmer opens the gate to the field.
A small boat drifts on a calm lake under a pale blue sky with soft wind.
Audio: gentle piano music, soft wind, distant birds and a calm voice.
Audio: crowd cheering, a referee whistle and the echo of a large stadium.
Audio: sizzling pan, clinking plates and kitchen noise with people talking.
Audio: waves crashing, seagulls calling and a light breeze over the sand.
She whispers a secret to her sister and both of them start to giggle.
He shouts across the street to stop the bus before it leaves the station.
A dancer spins on a wooden stage under warm yellow lights and the audience claps.
A robot walks through a factory and the machines hum and click around it.
The wind blows through the tall grass and a dog barks far away across the hill.
A girl plays the violin in the park while people stop, listen and quietly clap.
Fireworks explode over the harbour and the reflection shimmers on the water.
A pilot checks the instruments in the cockpit and speaks into the radio.
An engine roars as a motorcycle speeds along a winding mountain road.
A baby giggles while her father makes funny faces and sings a silly song.
Jazz trumpet, double bass and brushed drums fill a smoky underground club.
A horse gallops across the desert, kicking up dust under the burning sun.
Quietly, the librarian stacks books while a clock ticks on the wall.
"""


def train_spiece(vocab_size: int = 256) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2, no bos); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, user_defined_symbols=list(TAGS),
        character_coverage=1.0, num_threads=1, hard_vocab_limit=True, minloglevel=2)
    return buf.getvalue()


def tiny_config(vocab: int) -> UMT5Config:
    return UMT5Config(vocab=vocab, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2)


def tiny_state_dict(cfg: UMT5Config, seed: int) -> dict[str, torch.Tensor]:
    """Random official-layout weights, bf16 values chosen so that fp16 holds them exactly."""
    with torch.device("meta"):
        keys = {k: tuple(v.shape) for k, v in UMT5Encoder(cfg).state_dict(keep_vars=True).items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in keys.items():
        if k.endswith(("norm1.weight", "norm2.weight")) or k == "norm.weight":
            w = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif k.endswith("pos_embedding.embedding.weight"):
            w = 2.0 * torch.randn(shape, generator=g)  # strong enough that a wrong bucket shows in the output
        elif k == "token_embedding.weight":
            w = torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) / shape[1] ** 0.5
        w = w.to(torch.bfloat16)
        # below fp16's normal range fp16 would drop bits of a bf16 value
        sd[k] = torch.where(w.abs() < 2.0 ** -14, torch.zeros_like(w), w)
    return sd


def _spiece_tensor(model: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(model), dtype=torch.uint8)


def fp8_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3fn weight, float32 scalar scale) with the scale mapping the largest |w| to e4m3's max, 448."""
    scale = (w.float().abs().max() / 448.0).clamp(min=1e-12).reshape(())
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.float()


def write_tiny(out_dir: Path, seed: int) -> list[Path]:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    model_proto = train_spiece()
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model_proto)
    cfg = tiny_config(sp.get_piece_size())
    sd = tiny_state_dict(cfg, seed)

    wan = out_dir / "Wan2.2-TI2V-5B"
    tok_dir = wan / "google" / "umt5-xxl"
    comfy_dir = out_dir / "text_encoders"
    for d in (tok_dir, comfy_dir):
        d.mkdir(parents=True, exist_ok=True)
    paths = [wan / "models_t5_umt5-xxl-enc-bf16.pth", tok_dir / "spiece.model",
             comfy_dir / "umt5_xxl_fp16.safetensors", comfy_dir / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"]

    torch.save(sd, paths[0])
    paths[1].write_bytes(model_proto)

    fp16 = {comfy_key(k): v.to(torch.float16) for k, v in sd.items()}
    fp16["spiece_model"] = _spiece_tensor(model_proto)
    save_file(fp16, str(paths[2]))

    fp8: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn),
                                    "spiece_model": _spiece_tensor(model_proto)}
    for k, v in sd.items():
        ck = comfy_key(k)
        if v.dim() == 2 and not k.endswith(("embedding.weight",)):  # Linear weights only
            fp8[ck], fp8[ck[: -len("weight")] + "scale_weight"] = fp8_scaled(v)
        else:
            fp8[ck] = v.to(torch.float16)
    save_file(fp8, str(paths[3]))
    return paths

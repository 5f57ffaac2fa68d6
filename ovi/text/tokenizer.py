"""umT5 tokenizer on plain sentencepiece, framed exactly as the engine's Hugging Face tokenizer call."""

from __future__ import annotations

import re
from typing import Iterable

import torch

from .clean import whitespace_clean


class UMT5Tokenizer:
    """``tok(texts) -> (ids [B, seq_len] int64, mask [B, seq_len] int64)``, the official framing.

    The engine calls transformers' T5 tokenizer (fast, ``tokenizer.json`` or converted from ``spiece.model``)
    with ``padding='max_length', truncation=True, max_length=512, add_special_tokens=True`` on text cleaned by
    ``whitespace_clean``. That gives, per text: the sentencepiece ids of the cleaned text, cut to
    ``seq_len - 1``, then EOS ``</s>`` (id 1), then pad ``<pad>`` (id 0) on the right up to ``seq_len``;
    the mask is 1 on the text and the EOS. The same ids come from sentencepiece directly because:

    * the fast tokenizer's normalizer and Unigram model are converted from the same ``spiece.model``
      (precompiled NFKC charsmap, "▁" word prefix on every chunk, whitespace-split words), and the cleaned
      text has no runs of spaces or edge spaces, where the two could differ;
    * sentencepiece adds no BOS/EOS unless asked, so the single EOS here is the post-processor's
      ``$A </s>`` template, not a second one;
    * the HF tokenizer matches its special tokens (``</s>``, ``<pad>``, ``<unk>``) literally in the input
      before the model sees it; we do the same, encoding the text between them as separate chunks.

    ``sentencepiece`` is imported only when a tokenizer is built.
    """

    def __init__(self, model_proto: bytes, *, seq_len: int = 512, clean: bool = True):
        try:
            import sentencepiece as spm
        except ImportError as e:
            raise ImportError("The umT5 tokenizer needs the 'sentencepiece' package "
                              "(pip install sentencepiece).") from e
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(model_proto)
        self.seq_len = seq_len
        self.clean = clean
        # T5 models declare pad 0, eos 1, unk 2 in the model itself; the token strings are the HF names
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.sp.piece_to_id("</s>")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        self.unk_id = self.sp.unk_id()
        self._specials = {"</s>": self.eos_id, "<pad>": self.pad_id, "<unk>": self.unk_id}
        self._split = re.compile("(</s>|<pad>|<unk>)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        """Ids of one (already cleaned) text, without EOS and without truncation."""
        ids: list[int] = []
        for chunk in self._split.split(text):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def __call__(self, texts: str | Iterable[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.seq_len), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(texts), self.seq_len), dtype=torch.int64)
        for row, text in enumerate(texts):
            seq = self.tokenize(whitespace_clean(text) if self.clean else text)[: self.seq_len - 1] + [self.eos_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)])

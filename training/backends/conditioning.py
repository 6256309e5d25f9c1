"""The text conditioning a frozen network reads: token embeddings, optional pooled embeddings and an optional token mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCondition:
    """Token embeddings (B, L, D); for SDXL/SD3 pooled embeddings (B, P); for the families whose pipelines pass one
    (Qwen-Image, Chroma) a token mask (B, L), nonzero where the network attends, in the dtype the pipeline builds it in.

    ``mask`` None means every token counts. Conditions with a mask can be padded to a common length (zero rows, mask
    0) without changing what the network computes, so an unconditional and a conditional prompt of different token
    counts still share one network call.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def _map(self, fn, mask_fn=None) -> TextCondition:
        def apply(t, f):
            return None if t is None else f(t)

        return TextCondition(apply(self.embeds, fn), apply(self.pooled, fn), apply(self.mask, mask_fn or fn))

    def to(self, device, dtype=None) -> TextCondition:
        """Embeddings to ``device`` (and ``dtype``); the mask keeps its own dtype."""
        return self._map(lambda t: t.to(device=device, dtype=dtype or t.dtype), lambda m: m.to(device))

    def expand(self, batch: int) -> TextCondition:
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def repeat_interleave(self, repeats: int) -> TextCondition:
        """Each row ``repeats`` times in a row (Learn to Guide's particles of one image share its prompt)."""
        return self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    @property
    def tokens(self) -> int:
        return self.embeds.shape[1]

    def padded(self, length: int, mask_dtype: torch.dtype | None = None) -> TextCondition:
        """Zero token rows appended up to ``length``, masked out (a condition without a mask gets one of ones first)."""
        mask = self.mask
        if mask is None:
            mask = torch.ones(self.embeds.shape[:2], dtype=mask_dtype or torch.long, device=self.embeds.device)
        extra = length - self.tokens
        if extra <= 0:
            return TextCondition(self.embeds, self.pooled, mask)
        embeds = torch.nn.functional.pad(self.embeds, (0, 0, 0, extra))
        return TextCondition(embeds, self.pooled, torch.nn.functional.pad(mask, (0, extra)))

    @staticmethod
    def stack_pair(first: TextCondition, second: TextCondition, batch: int) -> TextCondition | None:
        """[first; second] along the batch, each expanded to ``batch`` rows; None when they cannot share a batch (different
        token counts without a mask, or different pooled shapes)."""
        first = first.expand(batch) if first.batch == 1 else first
        second = second.expand(batch) if second.batch == 1 else second
        if (first.pooled is None) != (second.pooled is None):
            return None
        if first.pooled is not None and first.pooled.shape != second.pooled.shape:
            return None
        if first.mask is not None or second.mask is not None:
            length = max(first.tokens, second.tokens)
            mask_dtype = (first.mask if first.mask is not None else second.mask).dtype
            first, second = first.padded(length, mask_dtype), second.padded(length, mask_dtype)
        if first.embeds.shape != second.embeds.shape:
            return None

        def join(a, b):
            return None if a is None else torch.cat([a, b.to(a.dtype)])

        return TextCondition(join(first.embeds, second.embeds), join(first.pooled, second.pooled), join(first.mask, second.mask))

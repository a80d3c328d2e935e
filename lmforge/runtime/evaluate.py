"""Perplexity of an artifact on a text: what `lmforge eval` reports.

The text is tokenized with the artifact's tokenizer (no BOS added) and cut into non-overlapping windows of
`window` tokens (the last, shorter one included); each window runs from an empty cache, and every token
after a window's first is predicted from the ones before it in that window. Then

    perplexity = exp(sum of -log p(token) / number of predicted tokens)

Windows run in batches (`batch` windows at a time) through `Engine.forward`; log-softmax is taken in
float32 whatever the compute dtype. The default window, 256 tokens, is the one the demo model's figures
in `lmforge/demo/README.md` use, so `lmforge eval` on a float32 demo artifact reproduces them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lmforge.errors import GenerationError


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens
    windows: int
    window: int
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def default_text() -> Path:
    """The demo model's held-out text (never trained on)."""
    from lmforge.demo import model_dir

    return model_dir() / "heldout.txt"


@torch.inference_mode()
def perplexity(engine, text: str | None = None, ids: list[int] | None = None, window: int = 256,
               batch: int = 8, progress=None) -> EvalResult:
    """Perplexity of `engine` on `text` (tokenized with its tokenizer) or on token `ids`."""
    if (text is None) == (ids is None):
        raise GenerationError("give either a text or token ids to evaluate")
    if ids is None:
        ids = engine._need_tokenizer().encode(text, add_special_tokens=False).ids
    if window < 2 or window > engine.max_seq_len:
        raise GenerationError(f"window must be between 2 and the artifact's max_seq_len {engine.max_seq_len}, "
                              f"got {window}")
    if len(ids) < 2:
        raise GenerationError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    chunks = [ids[i:i + window] for i in range(0, len(ids), window)]
    chunks = [c for c in chunks if len(c) >= 2]
    start = time.perf_counter()
    total, count = 0.0, 0
    for first in range(0, len(chunks), batch):
        group = chunks[first:first + batch]
        for same in _by_length(group):  # forward takes rectangular batches
            x = torch.tensor(same, dtype=torch.long, device=engine.device)
            logits = engine.forward(x).float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            total -= float(logp.gather(-1, x[:, 1:, None]).sum())
            count += x.shape[0] * (x.shape[1] - 1)
        if progress:
            progress(min(first + batch, len(chunks)), len(chunks))
    nll = total / count
    return EvalResult(math.exp(nll), nll, count, len(chunks), window, time.perf_counter() - start)


def _by_length(chunks: list[list[int]]) -> list[list[list[int]]]:
    groups: dict[int, list[list[int]]] = {}
    for c in chunks:
        groups.setdefault(len(c), []).append(c)
    return list(groups.values())

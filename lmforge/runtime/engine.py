"""The engine: runs an artifact's graph with a static KV cache. Needs torch, safetensors and tokenizers only.

    eng = lmforge.load("out")
    logits = eng.forward(input_ids)                      # (batch, seq, vocab), from an empty cache
    seq = eng.generate(input_ids, max_new_tokens=32)     # (batch, seq + new), like transformers

Batches of prompts of different lengths are left-padded (`attention_mask` 0 on the padding, as in
transformers); each row then gets its own positions, and padded slots are masked out of attention, so a
prompt gives the same tokens alone or in a batch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import fx

from lmforge.errors import ArtifactError, GenerationError
from lmforge.ir.graph import GraphIR, position_ids
from lmforge.runtime.artifact import Artifact
from lmforge.runtime import lean_step
from lmforge.runtime.kv_cache import KVCache
from lmforge.runtime.prefill import last_position_graph
from lmforge.runtime.sampling import SamplingConfig, next_token


def check_device(device: str | torch.device) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ArtifactError(f"unknown device {str(device)!r}; use 'cpu' or 'cuda'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError("device 'cuda' requested, but this machine has no usable CUDA GPU; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ArtifactError(f"device {device.type!r} is not supported; use 'cpu' or 'cuda'")
    return device


class Engine:
    def __init__(self, ir: GraphIR, max_seq_len: int, device: torch.device, artifact: Artifact | None = None,
                 tokenizer=None, weight_layout: str = "source", cost=None, rank: int = 0):
        """A ready graph (read, resharded and prepared for `device` by `lmforge.load`) and what runs it."""
        self.ir, self.max_seq_len, self.device = ir, max_seq_len, device
        self.weight_layout = weight_layout  # "source", "transposed" or "gemv": see runtime/layout.py
        self.artifact, self.tokenizer = artifact, tokenizer
        info = (artifact.manifest.get("tokenizer") or {}) if artifact else {}
        self.eos_token_id: int | None = info.get("eos_token_id")
        self.bos_token_id: int | None = info.get("bos_token_id")
        self.pad_token_id: int = info.get("pad_token_id") if info.get("pad_token_id") is not None else (self.eos_token_id or 0)
        out = next(n for n in ir.graph.nodes if n.op == "output")
        vocab = out.args[0][0].meta["spec"].shape[-1]
        self.vocab_size = int(vocab) if isinstance(vocab, int) else int(ir.config.get("vocab_size", 0))
        self._cache: KVCache | None = None
        if cost is None:
            from lmforge.ir.analysis import cost as graph_cost

            cost = graph_cost(ir)
        self.cost = cost  # FLOPs per token, of the graph as the artifact holds it (before load-time rewrites)
        self.load_seconds: float | None = None  # lmforge.load: reading, checking and preparing the artifact
        self.tp, self.rank = ir.tp, rank  # tensor-parallel ranks; this one's
        self._prefill_gm: fx.GraphModule | None | bool = False  # False: not built yet; None: the graph has none
        self._lean: tuple[fx.GraphModule, lean_step.LeanStats] | None | bool = False  # the decode step's (lean_step.py)

    # --- one step --------------------------------------------------------------------------------

    def _run(self, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             gm: fx.GraphModule | None = None) -> torch.Tensor:
        """ids, positions: (batch, seq); mask: (batch, kv_len), covering the cache up to and including ids."""
        return (gm or self.ir.gm)(ids, positions, mask, *cache.views(mask.shape[1]))[0]

    def lean_step(self) -> tuple[fx.GraphModule, lean_step.LeanStats] | None:
        """The graph the decode steps run, with its kernel calls in step programs, and its stats; None where there is
        none (not a CPU engine, `LMFORGE_LEAN_STEP=0`, no C compiler, nothing to record): `runtime/lean_step.py`."""
        if self._lean is False:
            self._lean = lean_step.lean_graph(self.ir) if lean_step.enabled(self.device) else None
        return self._lean

    def _cache_for(self, batch: int) -> KVCache:
        """The engine's cache, reallocated only when the batch size changes."""
        if self._cache is None or self._cache.batch != batch:
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = KVCache(self.ir.kv, batch, self.max_seq_len, self.device)
        return self._cache

    def _check_ids(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor):
            input_ids = torch.tensor(input_ids, dtype=torch.long)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
            raise GenerationError(f"input_ids must be (batch, seq) with seq >= 1, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise GenerationError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise GenerationError(f"token id {hi if hi >= self.vocab_size else lo} is outside the vocabulary (0..{self.vocab_size - 1})")
        input_ids = input_ids.to(self.device, torch.long)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise GenerationError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
        return input_ids, attention_mask.to(self.device, torch.long)

    # --- public API ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for `input_ids`, from an empty cache."""
        ids, mask = self._check_ids(input_ids, attention_mask)
        self._check_length(ids.shape[1], 0)
        cache = self._cache_for(ids.shape[0])
        positions = position_ids(mask)
        return self._run(cache, ids, positions, mask)

    __call__ = forward

    def _check_length(self, prompt_len: int, new_tokens: int) -> None:
        if prompt_len + new_tokens > self.max_seq_len:
            raise GenerationError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({new_tokens}) = {prompt_len + new_tokens} exceeds "
                f"this artifact's max_seq_len {self.max_seq_len}; shorten the prompt or re-run `lmforge optimize "
                f"--max-seq-len`"
            )

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt + up to `max_new_tokens` tokens, (batch, seq + new), like transformers' `generate`. Stops
        early once every row has produced `eos_token_id` (default: the tokenizer's); finished rows are then
        filled with the pad token."""
        ids, mask = self._check_ids(input_ids, attention_mask)
        sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
        steps = self.iter_tokens(ids, max_new_tokens, sampling, eos_token_id, generator, mask)
        return torch.cat([ids] + [token[:, None] for token in steps], dim=1)

    @torch.inference_mode()
    def iter_tokens(
        self,
        input_ids,
        max_new_tokens: int = 32,
        sampling: SamplingConfig = SamplingConfig(),
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Iterator[torch.Tensor]:
        """What `generate` does, yielding each step's tokens (batch,) as they are chosen."""
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        ids, mask = self._check_ids(input_ids, attention_mask)
        batch, prompt_len = ids.shape
        self._check_length(prompt_len, max_new_tokens)
        if max_new_tokens == 0:
            return
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        cache = self._cache_for(batch)
        full_mask = torch.zeros(batch, self.max_seq_len, dtype=torch.long, device=self.device)
        full_mask[:, :prompt_len] = mask

        logits = self.prefill(cache, ids, full_mask, prompt_len)
        positions = position_ids(mask)[:, -1:]
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            token = next_token(logits, sampling, generator)
            if self.tp > 1 and sampling.do_sample:  # every rank continues with rank 0's draw
                from lmforge.codegen.collectives import communicator

                token = communicator().broadcast(token)
            if eos is not None:
                token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
                done |= token == eos
            yield token
            if step == max_new_tokens - 1 or (eos is not None and bool(done.all())):
                return
            positions = positions + 1
            logits = self.decode(cache, token[:, None], positions, full_mask, prompt_len + step)

    def prefill(self, cache: KVCache, ids: torch.Tensor, full_mask: torch.Tensor, length: int) -> torch.Tensor:
        """Run the prompt; returns the last position's logits (batch, vocab), projected for that position only
        (`runtime/prefill.py`)."""
        mask = full_mask[:, :length]
        positions = position_ids(mask)
        if self._prefill_gm is False:
            self._prefill_gm = last_position_graph(self.ir)
        if self._prefill_gm is None:
            return self._run(cache, ids, positions, mask)[:, -1]
        return self._prefill_gm(ids, positions, mask, *cache.views(mask.shape[1]))[0][:, -1]

    def decode(self, cache: KVCache, token: torch.Tensor, positions: torch.Tensor, full_mask: torch.Tensor,
               length: int) -> torch.Tensor:
        """Run one new token per row at slot `length`; returns its logits (batch, vocab)."""
        full_mask[:, length] = 1
        lean = self.lean_step()
        return self._run(cache, token, positions, full_mask[:, : length + 1], lean[0] if lean else None)[:, -1]

    # --- text ------------------------------------------------------------------------------------

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise GenerationError("this artifact has no tokenizer; pass token ids instead of text (lmforge run --prompt-ids)")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens included as tokenizer.json's post-processor adds them."""
        ids = self._need_tokenizer().encode(text).ids
        if not ids:
            raise GenerationError("the prompt is empty after tokenization")
        return ids

    def decode_text(self, ids) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    def stream(self, prompt: str, max_new_tokens: int = 64, sampling: SamplingConfig = SamplingConfig(),
               eos_token_id: int | None = None, generator: torch.Generator | None = None) -> Iterator[str]:
        """Generate from a text prompt (batch 1), yielding text pieces as tokens arrive."""
        eos = eos_token_id if eos_token_id is not None else self.eos_token_id
        generated: list[int] = []
        printed = ""
        ids = torch.tensor([self.encode(prompt)])
        for token in self.iter_tokens(ids, max_new_tokens, sampling, eos, generator):
            if int(token[0]) == eos:
                break
            generated.append(int(token[0]))
            text = self.decode_text(generated)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(printed):]
                printed = text

#!/usr/bin/env python
"""Train the small demo language model that ships inside lmforge.

``lmforge optimize`` has to work offline, so the package carries a tiny but
real Hugging Face causal LM under ``lmforge/demo/model/``. This script builds
that model from scratch, deterministically, on a CPU:

1. Training text comes from CPython's own standard library:
   ``pydoc_data.topics.topics`` (the text of the Python language reference
   used by ``help()``). Topics are sorted by name and joined with blank lines.
   The last topics in sorted order (whole topics, about 5% of the characters)
   are held out and never used for the tokenizer or for training.
2. A byte-level BPE tokenizer (vocab 2048, special token ``<|endoftext|>``)
   is trained with the ``tokenizers`` library on the training split only.
3. A ``LlamaForCausalLM`` (4 layers, hidden 256, MLP 768, 4 query heads,
   2 KV heads, head_dim 64, tied embeddings) is randomly initialised with a
   fixed seed and trained in fp32 with AdamW (warmup + cosine decay, weight
   decay 0.1, grad-norm clip 1.0) on random 256-token windows.
4. Perplexity is measured on the held-out text and on a training sample, in
   fp32, then the model is saved in bfloat16 (to keep the package small),
   reloaded into fp32 and measured again.

Output directory (default ``lmforge/demo/model/`` next to this script's repo):
``config.json``, ``generation_config.json``, ``model.safetensors`` (bf16),
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
``heldout.txt`` and ``training.json`` (all measured numbers).

Run from anywhere. With the default 480 steps, training took 7.3 minutes
(0.9 s/step) on an otherwise idle 2-core CPU; expect it to take longer on a busy
machine::

    python scripts/train_demo_model.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "lmforge" / "demo" / "model"

SEED = 1234
VOCAB_SIZE = 2048
EOT = "<|endoftext|>"
SEQ_LEN = 256
BATCH = 16
LR = 3e-3
MIN_LR_FRAC = 0.1
WARMUP_FRAC = 0.05
WEIGHT_DECAY = 0.1
GRAD_CLIP = 1.0
HELDOUT_FRAC = 0.05
DEFAULT_STEPS = 480
NUM_THREADS = 2


def load_corpus() -> tuple[str, str, list[str], list[str]]:
    """Return (train_text, heldout_text, train_topic_names, heldout_topic_names)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    total = sum(len(topics[k]) for k in keys)
    held: list[str] = []
    held_chars = 0
    # Take whole topics from the end of the sorted list until at least 5% of
    # the characters are held out. Topics are never split, so the real share
    # is a bit larger (the last step adds the long "typesseq" topic: ~7.6%).
    for k in reversed(keys):
        if held_chars >= HELDOUT_FRAC * total:
            break
        held.insert(0, k)
        held_chars += len(topics[k])
    train_keys = [k for k in keys if k not in set(held)]
    train_text = "\n\n".join(topics[k] for k in train_keys)
    held_text = "\n\n".join(topics[k] for k in held)
    return train_text, held_text, train_keys, held


def train_tokenizer(train_text: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Feed the text in paragraph-sized chunks (one string would also work).
    chunks = [c for c in train_text.split("\n\n") if c]
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    return tok


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok.encode(text).ids, dtype=torch.long)


def lr_at(step: int, steps: int) -> float:
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return LR * (MIN_LR_FRAC + (1 - MIN_LR_FRAC) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, max_windows: int | None = None) -> tuple[float, int]:
    """Mean token NLL over non-overlapping SEQ_LEN windows -> (ppl, n_predicted_tokens).

    The trailing partial window is included. With ``max_windows`` the windows
    are taken evenly spaced over ``ids`` instead of all of them.
    """
    model.eval()
    n_full = len(ids) // SEQ_LEN
    starts = [i * SEQ_LEN for i in range(n_full)]
    if len(ids) - n_full * SEQ_LEN >= 2:
        starts.append(n_full * SEQ_LEN)
    if max_windows is not None and len(starts) > max_windows:
        stride = len(starts) / max_windows
        starts = [starts[int(i * stride)] for i in range(max_windows)]
    total_nll = 0.0
    total_tok = 0
    for s in starts:
        w = ids[s : s + SEQ_LEN].unsqueeze(0)
        logits = model(input_ids=w).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[0, :-1], w[0, 1:], reduction="sum"
        )
        total_nll += nll.item()
        total_tok += w.shape[1] - 1
    model.train()
    return math.exp(total_nll / total_tok), total_tok


def dir_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start = time.time()
    torch.set_num_threads(NUM_THREADS)
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    # ---------------------------------------------------------------- data
    train_text, held_text, train_keys, held_keys = load_corpus()
    print(
        f"corpus: {len(train_keys)} train topics ({len(train_text)} chars), "
        f"{len(held_keys)} held-out topics ({len(held_text)} chars): {held_keys}"
    )

    tok = train_tokenizer(train_text)
    eot_id = tok.token_to_id(EOT)
    train_ids = encode(tok, train_text)
    held_ids = encode(tok, held_text)
    print(
        f"tokenizer: vocab {tok.get_vocab_size()}, {EOT} id {eot_id}; "
        f"train {len(train_ids)} tokens, held-out {len(held_ids)} tokens"
    )

    # ---------------------------------------------------------------- model
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).float()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: LlamaForCausalLM, {n_params} parameters (tied embeddings counted once)")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": WEIGHT_DECAY},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
    )

    # ---------------------------------------------------------------- train
    gen = torch.Generator().manual_seed(SEED)
    max_start = len(train_ids) - SEQ_LEN - 1
    t_train = time.time()
    losses: list[float] = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps)
        starts = torch.randint(0, max_start + 1, (BATCH,), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()])
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        losses.append(out.loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(
                f"step {step:5d}/{args.steps} loss {losses[-1]:.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} gnorm {gnorm:.2f} "
                f"{el / (step + 1):.2f}s/step elapsed {el:.0f}s",
                flush=True,
            )
    train_wall = time.time() - t_train
    tail = losses[-max(1, min(20, len(losses))):]
    final_loss = sum(tail) / len(tail)
    print(f"training done in {train_wall:.1f}s; final loss (mean of last {len(tail)}) {final_loss:.4f}")

    # ---------------------------------------------------------------- eval fp32
    n_held_windows = math.ceil(len(held_ids) / SEQ_LEN)
    held_ppl, held_tok = perplexity(model, held_ids)
    train_ppl, train_tok = perplexity(model, train_ids, max_windows=n_held_windows)
    print(f"fp32: held-out ppl {held_ppl:.3f} ({held_tok} tok), train ppl {train_ppl:.3f} ({train_tok} tok)")

    # ---------------------------------------------------------------- save
    out_dir: Path = args.out.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.iterdir():
        if stale.is_file():
            stale.unlink()
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, do_sample=False
    )
    model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)

    tok.save(str(out_dir / "tokenizer.json"))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=str(out_dir / "tokenizer.json"),
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        model_max_length=config.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out_dir)
    stm = out_dir / "special_tokens_map.json"
    if not stm.exists():  # newer transformers fold this into tokenizer_config.json
        stm.write_text(
            json.dumps({"bos_token": EOT, "eos_token": EOT, "pad_token": EOT}, indent=2) + "\n"
        )
    (out_dir / "heldout.txt").write_text(held_text, encoding="utf-8")

    # ---------------------------------------------------------------- eval bf16 reload
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    held_ppl_bf16, _ = perplexity(reloaded, held_ids)
    train_ppl_bf16, _ = perplexity(reloaded, train_ids, max_windows=n_held_windows)
    print(f"bf16 reload: held-out ppl {held_ppl_bf16:.3f}, train ppl {train_ppl_bf16:.3f}")

    import tokenizers
    import transformers

    total_wall = time.time() - t_start
    files = dir_bytes(out_dir)
    record = {
        "description": "lmforge embedded demo model (LlamaForCausalLM) trained by scripts/train_demo_model.py",
        "seed": SEED,
        "params": n_params,
        "architecture": {
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 64,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
        },
        "data": {
            "source": "pydoc_data.topics.topics (CPython %s), sorted by key, joined with '\\n\\n'"
            % platform.python_version(),
            "train_topics": len(train_keys),
            "train_chars": len(train_text),
            "train_tokens": len(train_ids),
            "heldout_topics": held_keys,
            "heldout_chars": len(held_text),
            "heldout_char_fraction": round(len(held_text) / (len(train_text) + len(held_text)), 4),
            "heldout_tokens": len(held_ids),
        },
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size(), "eot_token": EOT, "eot_id": eot_id},
        "steps": args.steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * BATCH * SEQ_LEN,
        "optimizer": {
            "name": "AdamW",
            "lr": LR,
            "betas": [0.9, 0.95],
            "weight_decay": WEIGHT_DECAY,
            "schedule": f"linear warmup {max(1, int(WARMUP_FRAC * args.steps))} steps, cosine decay to {MIN_LR_FRAC} x lr",
            "grad_clip": GRAD_CLIP,
        },
        "lr": LR,
        "final_train_loss": round(final_loss, 4),
        "final_train_loss_note": f"mean training-batch loss over the last {len(tail)} steps",
        "fp32": {"train_perplexity": round(train_ppl, 3), "heldout_perplexity": round(held_ppl, 3)},
        "bf16_reloaded": {"train_perplexity": round(train_ppl_bf16, 3), "heldout_perplexity": round(held_ppl_bf16, 3)},
        "eval_tokens": {"heldout": held_tok, "train_sample": train_tok},
        "train_wall_time_s": round(train_wall, 1),
        "total_wall_time_s": round(total_wall, 1),
        "threads": NUM_THREADS,
        "device": "cpu",
        "train_dtype": "float32",
        "saved_dtype": "bfloat16",
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "tokenizers_version": tokenizers.__version__,
        "python_version": platform.python_version(),
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for f in out_dir.iterdir():
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; package data should be readable
    files = dir_bytes(out_dir)
    size = sum(files.values())
    print(json.dumps(files, indent=2))
    print(f"saved to {out_dir}: {size} bytes ({size / 1e6:.2f} MB)")
    if size > 10 * 1024 * 1024:
        print("WARNING: output folder is larger than 10 MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

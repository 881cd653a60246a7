"""Builds a small model locally: a real architecture's config (Qwen2, as in
Qwen2.5-0.5B but scaled down) with random weights, and a word-level tokenizer
trained on the spot. Nothing is downloaded. vLLM loads it like any model dir.

    python make_tiny_model.py models/tiny-qwen2 [--layers 4 --hidden 256 ...]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus(seed: int, lines: int = 20000):
    """Deterministic English-like text to train the tokenizer on."""
    import random

    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "an", "el", "or", "in", "the", "and", "of", "to"]
    words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
    words += "the a of to and in is it that for on with as was by this be at from or an are".split()
    for _ in range(lines):
        yield " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + "."


def build(
    out: str,
    layers: int = 8,
    hidden: int = 512,
    heads: int = 8,
    kv_heads: int = 2,
    intermediate: int = 1536,
    max_pos: int = 32768,
    seed: int = 0,
) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(out, exist_ok=True)
    # A byte-level BPE like Qwen's own, trained here on generated text, so the
    # Qwen2 tokenizer class that transformers picks for this config loads it.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    vocab = tok.get_vocab()

    cfg = Qwen2Config(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        # Wider than the usual 0.02 so that random weights still give varied
        # greedy outputs (an identical-output check then means something).
        initializer_range=0.3,
        bos_token_id=vocab["<|endoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": vocab["<|endoftext|>"], "do_sample": False}, f)
    print(
        f"model written to {out}: {layers} layers, hidden {hidden}, {heads} heads / {kv_heads} kv heads, vocab {len(vocab)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--max-pos", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.exists(os.path.join(a.out, "config.json")):
        print(f"model already at {a.out}")
        return
    build(a.out, a.layers, a.hidden, a.heads, a.kv_heads, a.intermediate, a.max_pos, a.seed)


if __name__ == "__main__":
    main()

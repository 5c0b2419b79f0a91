"""The model and tokenizer of the GPU check (`scripts/gpu_check.sh`): nothing is downloaded.

    python scripts/gpu_model.py tokenizer OUT_DIR HH_JSONL_GZ     BPE, 8,192 entries, trained on HH text
    python scripts/gpu_model.py model OUT_DIR TOKENIZER_DIR SIZE  random weights (seed 0), saved fp32

SIZE `qwen2-0.5b` is Qwen2-0.5B's shape (hidden 896, 24 layers, 14 query / 2 key-value heads,
intermediate 4864, vocabulary 151,936, tied embeddings: 494 M parameters); the tokenizer fills the
first 8,192 rows, as a real tokenizer leaves a model's spare rows unused, so the LM head costs what
Qwen2's does. `stand-in` is a 2-layer model of the same kinds of parts with a 32,768-row vocabulary,
for a dry run on a CPU.
"""
from __future__ import annotations

import gzip
import json
import sys

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936),
    "stand-in": (64, 2, 4, 2, 128, 32768),
}


def tokenizer(out: str, hh: str) -> None:
    from directpo.toy import train_tokenizer

    texts = []
    with gzip.open(hh, "rt") as f:
        for line in f:
            row = json.loads(line)
            texts += [row["chosen"], row["rejected"]]
    tok = train_tokenizer(texts, vocab_size=8192)
    tok.save_pretrained(out)
    print(f"tokenizer: {len(tok)} entries, saved to {out}")


def model(out: str, tokenizer_dir: str, size: str) -> None:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv_heads, inter, vocab = SIZES[size]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=4096,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 0.5 B weights: seconds there
        m = Qwen2ForCausalLM(config)
    m.to("cpu").save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in m.parameters())
    print(f"model: {size}, {n / 1e6:.1f} M parameters, vocabulary {vocab} (tokenizer {len(tok)}), saved to {out}")


if __name__ == "__main__":
    what, *args = sys.argv[1:]
    {"tokenizer": tokenizer, "model": model}[what](*args)

"""Write a tiny Qwen3-architecture seed with random weights, as a Hugging Face folder.

No real Qwen-style model is available offline, so the study beside this file starts from this
stand-in: transformers' own `Qwen3Config` / `Qwen3ForCausalLM` (q/k RMSNorm, head_dim 64 while
d_model / n_head = 32, grouped-query attention) with its default random initialisation, and a
byte-level BPE tokenizer without merges (256 bytes + <|endoftext|>). The numbers a study reports
from it say that the pipeline runs on this family, not how a pretrained Qwen3 upcycles.

    python recipes/qwen_tiny/make_seed.py --out runs/qwen_tiny/hf
    bam import-hf runs/qwen_tiny/hf --out runs/qwen_tiny/import/qwen_tiny.safetensors
    bam pipeline recipes/qwen_tiny/study.yaml          (--check: compose and check, train nothing)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

VOCAB = 320  # 256 byte tokens + <|endoftext|>, rounded up to a multiple of 64
EOS = "<|endoftext|>"


def write_byte_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))} | {EOS: 256}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}, indent=2))


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random weights")
    args = parser.parse_args(argv)
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=256)
    Qwen3ForCausalLM(config).save_pretrained(out)
    write_byte_tokenizer(out)
    print(f"tiny random Qwen3 seed in {out}")
    return out


if __name__ == "__main__":
    main()

"""Sampling from a GPT through its KV cache, and the `bam generate` command.

`generate()` is a small loop over the model's cached forward (`GPT.forward(..., cache=...)`):
one prefill of the left-padded prompts, then one token per call. It knows nothing of the model
kind, so dense seeds, experts and every mixture decode the same way. The per-token path stays
lean: a preallocated cache, logits of the last position only, no tensor built that the step does
not need, and `torch.inference_mode`.

A checkpoint names its tokenizer by fingerprint: `byte` needs nothing more; a BPE (`bpe-...`) or
an imported model's tokenizer (`hf-...`) is read from the files a `.ckpt` carries
(`checkpoint["bam_lightning"]["tokenizer_files"]`, written by `lit.py`), else from the folder a
`.safetensors` names in its metadata (`bam_lightning.tokenizer_dir`, written by `bam import-hf`),
else from a `tokenizer.json` beside the file. The fingerprint must match in every case.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bam_lightning.checkpoint import SourceCheckpoint, read_checkpoint
from bam_lightning.data.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    TextTokenizer,
    load_tokenizer,
)
from bam_lightning.model import GPT

TOKENIZER_DIR_KEY = "bam_lightning.tokenizer_dir"  # safetensors metadata: a folder relative to the file


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float) -> None:
    """Refuse sampling settings that mean nothing, before any work."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or unset), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V]: argmax at temperature 0, else a draw from the
    softmax of logits / temperature restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (the most likely token always stays)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        beyond = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reached p
        logits = logits.scatter(-1, order, ordered.masked_fill(beyond, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def check_prompts(prompts: Sequence[Sequence[int]], config) -> None:
    """Every prompt non-empty, within max_seq_len and the vocabulary; errors name the prompt."""
    if not prompts:
        raise ValueError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: give at least one token")
        if len(prompt) > config.max_seq_len:
            raise ValueError(f"prompt {i} has {len(prompt)} tokens, more than the model's max_seq_len "
                             f"{config.max_seq_len}")
        bad = [t for t in prompt if not 0 <= t < config.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {config.vocab_size}): {bad[:5]}")


@torch.inference_mode()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
             on_step: Callable[[list[int]], None] | None = None,
             stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """The new tokens of each prompt (token-id lists), stopping a row at `eos_id` (kept).

    Prompts of different lengths are left-padded into one batch; each row gets the tokens it
    would get alone: up to `max_new_tokens`, and no more than its own context allows (a row
    stops when it reaches the model's max_seq_len; the rows beside it go on).
    `on_step(tokens)` sees each step's new token of every row (streaming); a finished row
    repeats `eos_id` there (None without one). `seed` makes sampling repeatable.
    `stop(row_tokens)` ends a row early when it returns True (stop strings: the caller decodes
    and trims).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    check_prompts(prompts, model.config)
    cfg = model.config
    device = model.tok_emb.weight.device
    longest, shortest = max(map(len, prompts)), min(map(len, prompts))
    # per row: the last new token needs no slot, so a prompt of n tokens has room for S - n + 1
    limits = [min(max_new_tokens, cfg.max_seq_len - len(prompt) + 1) for prompt in prompts]
    steps = max(limits)
    idx = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        idx[row, longest - len(prompt):] = torch.as_tensor(list(prompt))
        mask[row, longest - len(prompt):] = True
    idx, mask = idx.to(device), mask.to(device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        # a short row runs up to `longest - shortest` columns past max_seq_len, over its own padding
        cache = model.new_cache(len(prompts), longest + steps - 1, padding=longest - shortest)
        logits = model(idx, cache=cache, attention_mask=None if bool(mask.all()) else mask, last_only=True)[0]
        outputs: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in range(steps):
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            new = token.tolist()
            for row, t in enumerate(new):
                if not done[row]:
                    outputs[row].append(t)
                    done[row] = (t == eos_id or len(outputs[row]) == limits[row]
                                 or (stop is not None and stop(outputs[row])))
                else:
                    new[row] = eos_id
            if on_step is not None:
                on_step(new)
            if all(done) or step == steps - 1:
                break
            logits = model(token[:, None], cache=cache, last_only=True)[0]
    finally:
        model.train(was_training)
    return outputs


# ----- loading a checkpoint for generation -----

def load_for_generation(path: str | Path, tokenizer: str | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> tuple[GPT, TextTokenizer]:
    """The model in a `.ckpt` or `.safetensors` file (read safely, memory-mapped) and its tokenizer."""
    source = read_checkpoint(path)
    text_tokenizer = checkpoint_tokenizer(source, tokenizer)
    with torch.device("meta"):
        model = GPT(source.config)
    try:
        model.load_state_dict(source.state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: weights do not fit the stored config: {error}") from error
    return model.to(device=device, dtype=dtype).eval(), text_tokenizer


def stored_tokenizer_files(path: Path) -> dict[str, str]:
    """name -> text of the tokenizer files a `.ckpt` carries ({} for none or a `.safetensors`)."""
    if path.suffix == ".safetensors":
        return {}
    raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return dict((raw.get("bam_lightning") or {}).get("tokenizer_files") or {})


def stored_tokenizer_dir(path: Path) -> Path | None:
    """The tokenizer folder a `.safetensors` file's metadata names (imported models), if any."""
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    folder = (header.get("__metadata__") or {}).get(TOKENIZER_DIR_KEY)
    return path.parent / folder if folder else None


def tokenizer_from_file(path: str | Path, fingerprint: str | None) -> TextTokenizer:
    """Load `path` (a tokenizer.json or its folder) as the kind its fingerprint names."""
    if fingerprint and fingerprint.startswith("hf-"):
        from bam_lightning.data.hf_tokenizer import (
            HFTokenizer,  # an imported model's (bam import-hf)
        )

        path = Path(path)
        return HFTokenizer(path / TOKENIZER_FILE if path.is_dir() else path)
    return load_tokenizer(str(path))


def checkpoint_tokenizer(source: SourceCheckpoint, override: str | None = None) -> TextTokenizer:
    """The tokenizer a checkpoint was trained with: `override` ("byte" or a tokenizer.json path,
    checked against the stored fingerprint), else what the checkpoint carries or names, else a
    `tokenizer.json` beside it; a clear error when none of these exists."""
    path, fingerprint = Path(source.path), source.tokenizer

    def checked(tokenizer: TextTokenizer, where: str) -> TextTokenizer:
        if fingerprint and tokenizer.fingerprint != fingerprint:
            raise ValueError(f"{path}: trained with tokenizer {fingerprint!r}, but {where} is "
                             f"{tokenizer.fingerprint!r}")
        if tokenizer.vocab_size > source.config.vocab_size:
            raise ValueError(f"{path}: the tokenizer from {where} has {tokenizer.vocab_size} tokens, more than "
                             f"the model's vocab_size {source.config.vocab_size}")
        return tokenizer

    if override:
        tokenizer = ByteTokenizer() if override == "byte" else tokenizer_from_file(override, fingerprint)
        return checked(tokenizer, f"--tokenizer {override}")
    if fingerprint == "byte":
        return ByteTokenizer()
    files = stored_tokenizer_files(path)
    if TOKENIZER_FILE in files:
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / Path(name).name).write_bytes(text.encode("utf-8"))
            return checked(tokenizer_from_file(Path(tmp) / TOKENIZER_FILE, fingerprint), "the tokenizer it carries")
    folder = stored_tokenizer_dir(path)
    if folder is not None and (folder / TOKENIZER_FILE).is_file():
        return checked(tokenizer_from_file(folder / TOKENIZER_FILE, fingerprint), str(folder / TOKENIZER_FILE))
    beside = path.with_name(TOKENIZER_FILE)
    if beside.is_file():
        return checked(tokenizer_from_file(beside, fingerprint), str(beside))
    raise ValueError(f"{path}: the checkpoint carries no tokenizer (fingerprint {fingerprint!r}) and there is no "
                     f"{TOKENIZER_FILE} beside it; pass --tokenizer byte or --tokenizer PATH/{TOKENIZER_FILE} "
                     "(the data_dir of the run that trained it holds it)")


# ----- the `bam generate` command -----

def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; a `.jsonl` file holds one JSON string per line (for newlines)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if Path(path).suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            value = json.loads(line)
            if not isinstance(value, str):
                raise ValueError(f"{path}:{number}: expected a JSON string, got {type(value).__name__}")
            prompts.append(value)
        lines = prompts
    if not lines:
        raise ValueError(f"{path}: no prompts in the file")
    return lines


class TextStream:
    """Prints a single row's text as tokens arrive; holds back a split multi-byte character."""

    def __init__(self, tokenizer: TextTokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def __call__(self, tokens: list[int]) -> None:
        if tokens[0] == self.tokenizer.eos_id:
            return
        self.ids.append(tokens[0])
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self.finish(text)

    def finish(self, text: str | None = None) -> None:
        """Write what is not shown yet (at the end: even an undecodable tail)."""
        text = self.tokenizer.decode(self.ids) if text is None else text
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bam generate", description="Sample text from a checkpoint "
                                     "(.ckpt or .safetensors) with its KV cache.")
    parser.add_argument("--ckpt", required=True, help="model checkpoint: .ckpt or .safetensors")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt; its continuation streams to the terminal")
    which.add_argument("--prompts", help="a file of prompts, one per line (.jsonl: one JSON string a line), "
                                         "decoded as one left-padded batch")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per prompt (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; >0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a tokenizer.json, for checkpoints that carry none")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and cache dtype")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
        texts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        model, tokenizer = load_for_generation(args.ckpt, args.tokenizer, args.device, dtype)
        prompts = [tokenizer.encode_prompt(text) for text in texts]  # with the tokenizer's BOS
        check_prompts(prompts, model.config)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"bam generate: error: {error}")
    eos = None if args.ignore_eos else tokenizer.eos_id
    stream = TextStream(tokenizer) if len(prompts) == 1 else None
    if stream is not None:
        sys.stdout.write(texts[0])
    started = time.perf_counter()
    try:
        outputs = generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                           top_p=args.top_p, seed=args.seed, eos_id=eos, on_step=stream)
    except ValueError as error:
        sys.exit(f"\nbam generate: error: {error}")
    seconds = time.perf_counter() - started
    if stream is None:
        for i, (text, ids) in enumerate(zip(texts, outputs, strict=True)):
            print(f"=== prompt {i} ===\n{text}{tokenizer.decode(ids)}")
    else:
        stream.finish()
        print()
    new_tokens = sum(map(len, outputs))
    print(f"[bam generate] {new_tokens} new tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"batch {len(prompts)})", file=sys.stderr)

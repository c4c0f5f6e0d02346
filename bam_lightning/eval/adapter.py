"""Our model as an lm-evaluation-harness model: `BamLM`, registered as `bam`.

lm-eval owns the tasks, prompts, few-shot sampling, metrics and aggregation; this class only
turns its requests into forwards of our GPT. Any checkpoint `read_checkpoint` reads is scored as
it is (dense, expert, BAM Expert-KV / Shared-KV, BTX): there is one model class.

Why it is faster than lm-eval's `hf` model on the same weights (benchmarks/bench_eval.py): the
choices of one question share one prefill of their context (ARC's four answers run their question
once), contexts are batched with others of like context and answer lengths so a batch pads
little, identical (context, continuation) pairs run once, and the log-softmax runs over the
continuation positions only, never over the whole [B, T, V] logits.
Generation is greedy over the KV cache (`bam_lightning.generate.generate`) with stop strings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  (fills lm-eval's model registry: see `register_model("bam")` below)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from bam_lightning.data.tokenizer import TextTokenizer
from bam_lightning.generate import generate, load_for_generation
from bam_lightning.model import GPT

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until tasks


def encode_prompt(tokenizer: TextTokenizer, text: str) -> list[int]:
    """`text` with the tokenizer's own special tokens (a BOS where the tokenizer adds one), as
    lm-eval's `hf` model encodes a prompt (add_special_tokens=True)."""
    return list(tokenizer.encode_prompt(text))


def bos_id(tokenizer: TextTokenizer) -> int | None:
    """The id the tokenizer puts before a prompt, if it puts one."""
    ids = encode_prompt(tokenizer, "")
    return ids[0] if ids else None


# lm-eval 0.4.13 fills its model registry ("hf", "vllm", ...) on the first lookup only if the
# registry is still empty. Registering "bam" into an empty registry would hide every other model
# for the rest of the process (`simple_evaluate(model="hf")` then fails), so `lm_eval.models` (lazy
# placeholders, no heavy imports) is imported above first.
@register_model("bam")
class BamLM(TemplateLM):
    """lm-eval's view of a `GPT` and its tokenizer (both as `load_for_generation` returns them)."""

    def __init__(self, model: GPT | None = None, tokenizer: TextTokenizer | None = None, *, ckpt: str | None = None,
                 batch_size: int | str = 16, device: str = "cpu", dtype: str = "fp32",
                 max_length: int | None = None, progress: bool = True, **_ignored):
        super().__init__()
        if model is None:  # `lm_eval --model bam --model_args ckpt=PATH`
            if ckpt is None:
                raise ValueError("BamLM needs a model and tokenizer, or ckpt=PATH")
            torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
            model, tokenizer = load_for_generation(ckpt, None, device, torch_dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.max_seq_len)
        self.progress = progress
        self._bos = bos_id(tokenizer)

    # ----- what TemplateLM needs -----

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS where the tokenizer has one, else EOS."""
        return self._bos if self._bos is not None else self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.fingerprint

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is False:
            return self.tokenizer.encode(string)
        return encode_prompt(self.tokenizer, string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----- scoring -----

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation)
        for each (key, context tokens, continuation tokens).

        Requests sharing a context (the choices of one question) run that context once: a batch
        of contexts is prefilled into the KV cache, each cache row is repeated once per choice,
        and the choices run as one more chunk. A pair longer than max_length (+1: the last token
        is never fed) has its context left-truncated and runs alone, as lm-eval's `hf` does.
        """
        unique: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a continuation encodes to no tokens; nothing to score")
            unique.setdefault((tuple(context), tuple(continuation)), len(unique))
        pairs = list(unique)
        by_context: dict[tuple[int, ...], list[int]] = {}
        long = []
        for i, (context, continuation) in enumerate(pairs):
            if context and len(context) + len(continuation) <= self.max_length + 1:
                by_context.setdefault(context, []).append(i)
            else:
                long.append(i)
        scores: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = tqdm(total=len(pairs), desc="scoring", disable=disable_tqdm or not self.progress)
        # A batch costs (contexts x its longest context) + (continuations x its longest one), so
        # both must be alike within a batch: contexts are grouped by their longest continuation
        # (in buckets a factor sqrt(2) wide), then sorted by length inside a bucket. Sorting by
        # context + continuation length instead mixed ARC's long questions with PIQA's long
        # solutions: 19.7k tokens run for 10.0k real ones, against 13.9k (ARC-Easy + PIQA, 100 each).
        contexts = sorted(by_context, key=lambda c: (continuation_bucket(max(len(pairs[i][1]) for i in by_context[c])),
                                                     len(c)), reverse=True)
        start = 0
        while start < len(contexts):  # up to batch_size continuations a forward, at least one context
            end, rows = start, 0
            while end < len(contexts) and (end == start or rows + len(by_context[contexts[end]]) <= self.batch_size):
                rows += len(by_context[contexts[end]])
                end += 1
            chunk = contexts[start:end]
            members = [by_context[c] for c in chunk]
            for i, score in zip([i for m in members for i in m],
                                self._score_shared(chunk, [[pairs[i][1] for i in m] for m in members]), strict=True):
                scores[i] = score
            bar.update(rows)
            start = end
        for i in long:
            context, continuation = pairs[i]
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            split = len(whole) - len(continuation)
            if split < 1:
                raise ValueError(f"a continuation of {len(continuation)} tokens leaves no room for context in "
                                 f"max_length {self.max_length}")
            scores[i] = self._score_shared([tuple(whole[:split])], [[continuation]])[0]
            bar.update(1)
        bar.close()
        return [scores[unique[(tuple(c), tuple(t))]] for _, c, t in requests]

    def _score_shared(self, contexts: list[tuple[int, ...]], continuations: list[list[tuple[int, ...]]]):
        """Scores of each context's continuations, contexts prefilled once (left-padded batch)."""
        device = self.device
        width = max(map(len, contexts))
        longest = max(len(c) for group in continuations for c in group)
        if width + longest - 1 > self.max_length and len(contexts) > 1:  # together they overflow: one by one
            return [s for context, group in zip(contexts, continuations, strict=True)
                    for s in self._score_shared([context], [group])]
        idx = torch.zeros(len(contexts), width, dtype=torch.long)
        mask = torch.zeros(len(contexts), width, dtype=torch.bool)
        for row, context in enumerate(contexts):
            idx[row, width - len(context):] = torch.as_tensor(context)
            mask[row, width - len(context):] = True
        cache = self.model.new_cache(len(contexts), width + longest - 1)
        first = self.model(idx.to(device), cache=cache, attention_mask=None if bool(mask.all()) else mask.to(device),
                           last_only=True)[0][:, -1]  # [B, V]: predicts each continuation's first token
        owners = [row for row, group in enumerate(continuations) for _ in group]
        flat = [c for group in continuations for c in group]
        rest = None
        if longest > 1:  # the continuations' tokens but the last, right-padded (causal: padding is never seen)
            cache.select_rows(torch.as_tensor(owners, device=device))
            tail = torch.zeros(len(flat), longest - 1, dtype=torch.long)
            for row, continuation in enumerate(flat):
                tail[row, :len(continuation) - 1] = torch.as_tensor(continuation[:-1])
            rest = self.model(tail.to(device), cache=cache)[0]
        out = []
        for row, (owner, continuation) in enumerate(zip(owners, flat, strict=True)):
            logits = first[owner:owner + 1]
            if len(continuation) > 1:
                logits = torch.cat([logits, rest[row, :len(continuation) - 1]])
            logprobs = logits.float().log_softmax(dim=-1)
            target = torch.as_tensor(continuation, device=logprobs.device)
            out.append((logprobs.gather(-1, target[:, None]).sum().item(),
                        bool((logprobs.argmax(dim=-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of max_length tokens (each window
        sees the tokens before it, up to max_length), as lm-eval defines it."""
        windows, owner = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            tokens = self.tokenizer.encode(text)
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(number)
        totals = [0.0] * len(requests)
        for number, (score, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[number] += score
        return totals

    # ----- generation -----

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations over the KV cache, each cut at its first stop string."""
        groups: dict[str, list[int]] = {}
        for number, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(number)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="generating", disable=disable_tqdm or not self.progress)
        for members in groups.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            stops = [*until, self.tokenizer.decode([self.eot_token_id])]
            stops = [s for s in stops if s]
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            keep = max(1, self.max_length - max_new)
            prompts = {n: self.tok_encode(requests[n].args[0])[-keep:] for n in members}
            ordered = sorted(members, key=lambda n: -len(prompts[n]))
            for start in range(0, len(ordered), self.batch_size):
                chunk = ordered[start:start + self.batch_size]
                outputs = generate(self.model, [prompts[n] for n in chunk], max_new, temperature=0.0,
                                   eos_id=self.eot_token_id, stop=self._stopper(stops))
                for n, tokens in zip(chunk, outputs, strict=True):
                    results[n] = cut_at_stops(self.tokenizer.decode(
                        [t for t in tokens if t != self.eot_token_id]), until)
                bar.update(len(chunk))
        bar.close()
        return results

    def _stopper(self, stops: list[str]):
        def stop(tokens: list[int]) -> bool:
            text = self.tokenizer.decode(tokens[-32:])  # a stop string is short; the tail is enough
            return any(s in text for s in stops)
        return stop if stops else None


def continuation_bucket(length: int) -> int:
    """Continuation lengths in buckets a factor sqrt(2) wide (1, 2, 3, 4-5, 6-7, 8-11, ...)."""
    return int(2 * math.log2(length))


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to its first stop string (lm-eval's rule for generate_until)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


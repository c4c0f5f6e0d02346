"""Upcycling: N dense state dicts -> one mixture state dict (BAM_SPEC.md, "Initialising the mixture").

Pure functions, no Lightning. Every source is validated (key set, shapes, vocabulary, layer count,
fit to the mixture config) before a single tensor is copied, and every error names the source and
the key or field. The mixture is built key by key from the target model's own state-dict layout
(a meta-device GPT), so no shape logic is duplicated here: a key is either an expert bank filled
from the sources (expert j <- model j), a mean of the sources, a copy of the seed, or a router.

`ModelConfig.ffn_gate_scale` is a forward-time multiplier: upcycling leaves weights unchanged for it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from bam_lightning.checkpoint import SourceCheckpoint, describe_config_mismatch, read_checkpoint
from bam_lightning.config import ModelConfig
from bam_lightning.model import GPT

METHODS = ("bam", "bam_shared_kv", "btx", "sparse")

# Fields that decide what the weights are and mean. Others (init_std, max_seq_len, router and
# loss settings) may differ between a dense source and the mixture without changing any weight.
ARCHITECTURE_FIELDS = ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "rope_base",
                       "tie_embeddings", "norm", "norm_eps", "block_layout", "head_dim", "rotary_dim",
                       "rope_scaling", "sliding_window", "qkv_bias", "attn_out_bias", "qk_norm", "ffn_activation",
                       "ffn_bias", "norm_bias", "parallel_ffn_norm")
# attention tensors of the query side (one per expert in both BAM variants) and of the K/V side
# (one per expert in Expert-KV, shared in Shared-KV): K's norm and biases go with K
QUERY_SIDE = ("wq", "wo", "bq", "bo", "q_norm")


# ----- validation -----
def check_method(method: str, n_sources: int, moe_config: ModelConfig, seed_index: int = 0) -> None:
    """The number of sources must fit the method and the mixture config (checked before any IO)."""
    if method not in METHODS:
        raise ValueError(f"unknown upcycling method {method!r}; choose one of {list(METHODS)}")
    if n_sources < 1:
        raise ValueError("upcycling needs at least one dense source")
    if not 0 <= seed_index < n_sources:
        raise ValueError(f"seed_index {seed_index} is out of range for {n_sources} sources")
    cfg, n = moe_config, n_sources
    if method in ("bam", "bam_shared_kv"):
        if cfg.attn_experts != n or cfg.n_experts != n:
            raise ValueError(f"{method} builds one attention and one FFN expert per source: {n} sources need "
                             f"attn_experts = n_experts = {n}, the mixture config has attn_experts="
                             f"{cfg.attn_experts}, n_experts={cfg.n_experts}")
        if cfg.attn_shared_kv != (method == "bam_shared_kv"):
            raise ValueError(f"{method} needs attn_shared_kv={method == 'bam_shared_kv'}, "
                             f"the mixture config has {cfg.attn_shared_kv}")
    else:
        if cfg.attn_experts != 0:
            raise ValueError(f"{method} keeps one attention: the mixture config needs attn_experts=0, "
                             f"got {cfg.attn_experts}")
        if cfg.n_experts < 1:
            raise ValueError(f"{method} needs n_experts >= 1, got {cfg.n_experts}")
        if method == "btx" and cfg.n_experts < n:
            raise ValueError(f"btx puts source j in FFN expert j: {n} sources need n_experts >= {n}, "
                             f"got {cfg.n_experts}")


def validate_sources(dense_state_dicts: Sequence[Mapping[str, Tensor]], moe_config: ModelConfig, method: str,
                     *, seed_index: int = 0, sources: Sequence[str] | None = None) -> None:
    """Refuse sources that cannot form `moe_config`; raises ValueError / KeyError naming source and key."""
    names = _source_names(dense_state_dicts, sources)
    check_method(method, len(dense_state_dicts), moe_config, seed_index)
    expected = _shapes(moe_config.dense())
    ref_name, ref = names[0], dense_state_dicts[0]
    ref_sizes = _sizes(ref_name, ref)
    for name, state in zip(names, dense_state_dicts, strict=True):
        routers = [key for key in state if key.endswith("router.weight")]
        if routers:
            raise ValueError(f"{name}: is a mixture state dict (has {routers[0]!r}), expected dense")
        for field, value in _sizes(name, state).items():
            if value != ref_sizes[field]:
                raise ValueError(f"{name}: {field} {value} vs {ref_sizes[field]} in {ref_name}")
            if value != getattr(moe_config, field):
                raise ValueError(f"{name}: {field} {value} vs {getattr(moe_config, field)} in the mixture config")
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing:
            raise KeyError(f"{name}: missing key {missing[0]!r}" + _more(missing))
        if extra:
            raise KeyError(f"{name}: unexpected key {extra[0]!r}" + _more(extra))
        for key, shape in expected.items():
            got, ref_shape = tuple(state[key].shape), tuple(ref[key].shape)
            if got != ref_shape:
                raise ValueError(f"{name}: key {key!r} has shape {list(got)}, but {ref_name} has {list(ref_shape)}")
            if got != shape:
                raise ValueError(f"{name}: key {key!r} has shape {list(got)}, the mixture config's dense "
                                 f"shape is {list(shape)}")


# ----- the mixture -----
CHUNK_BYTES = 16 * 2**20  # source data read per step of the streaming loop


def upcycle(dense_state_dicts: Sequence[Mapping[str, Tensor]], moe_config: ModelConfig, method: str, *,
            seed_index: int = 0, router_seed: int = 0, sources: Sequence[str] | None = None,
            out: Mapping[str, Tensor] | None = None, release: Callable[[int, Tensor], None] | None = None,
            chunk_bytes: int = CHUNK_BYTES) -> dict[str, Tensor]:
    """Build the mixture's state dict (GPT keys) from N dense ones, in expert order.

    - `bam` (Expert-KV): expert j's W_q, W_k, W_v, W_o and FFN <- model j.
    - `bam_shared_kv`: expert j's W_q, W_o and FFN <- model j; the shared W_k, W_v = mean of N.
    - `btx`: FFN expert j <- model j; the one attention = mean of N.
    Biases and q/k norms (other families) follow their projection: b_q, b_o and q's norm as W_q,
    b_k, b_v and k's norm as W_k (shared and averaged in Shared-KV, averaged in BTX). Parameter-matched BTX
      (n_experts > N): FFN experts N.. are copies of the seed's FFN.
    - `sparse`: only `dense_state_dicts[seed_index]` is used (other sources are validated, then
      ignored): every FFN expert and every other tensor is a copy of the seed.
    Embeddings, LM head and all norms are the mean of the N sources (sparse: the seed's).
    Routers follow `moe_config.router_init`, drawn from a generator seeded with `router_seed`.
    Means accumulate in at least float32; every tensor keeps its source's dtype (or `out`'s).

    Streaming: each mixture tensor is filled `chunk_bytes` of source data at a time, and after a
    chunk of source j is used `release(j, chunk)` may drop it from memory (memory-mapped
    checkpoints, `upcycle_from_checkpoints`). With `out` (e.g. the target model's own state dict)
    the mixture is written into those tensors in place, so peak memory is the mixture plus a few
    chunks, not N dense models plus the mixture.
    """
    validate_sources(dense_state_dicts, moe_config, method, seed_index=seed_index, sources=sources)
    seed = dense_state_dicts[seed_index]
    generator = torch.Generator().manual_seed(router_seed)
    dtype = seed["tok_emb.weight"].dtype
    result: dict[str, Tensor] = {}
    for key, shape in _shapes(moe_config).items():
        rule = _rule(key, method)
        target = out[key] if out is not None else None
        if target is not None and tuple(target.shape) != tuple(shape):
            raise ValueError(f"out[{key!r}] has shape {list(target.shape)}, the mixture needs {list(shape)}")
        if rule == "router":
            router = _router(shape, moe_config, generator)
            result[key] = router.to(dtype) if target is None else target.copy_(router)
            continue
        if target is None:
            target = torch.empty(shape, dtype=seed[key].dtype)
        _fill(target, key, rule, dense_state_dicts, seed_index, release, chunk_bytes)
        result[key] = target
    return result


def _fill(target: Tensor, key: str, rule: str, states: Sequence[Mapping[str, Tensor]], seed_index: int,
          release: Callable[[int, Tensor], None] | None, chunk_bytes: int) -> None:
    """Fill one mixture tensor from the sources, a chunk of each source at a time.

    Viewed flat, a mixture tensor is `slots` copies of the dense tensor's layout: an expert bank
    `[E, ...]` built from dense `[1, ...]` (or concatenated along dim 0) has E slots, a shared
    tensor one. So every rule works on element ranges [a, b) of the flattened dense tensor:
    'mean' writes the mean of the sources, 'seed' copies the seed into every slot, 'experts'
    puts source j in slot j and the seed in any extra slot.
    """
    sources = [state[key].reshape(-1) for state in states]
    numel = sources[0].numel()
    if target.numel() % numel:
        raise ValueError(f"{key}: mixture tensor of {target.numel()} elements is not a whole number of "
                         f"dense tensors of {numel}")
    if not target.is_contiguous():
        raise ValueError(f"{key}: the output tensor must be contiguous")
    slots = target.numel() // numel
    flat = target.view(slots, numel)
    step = max(1, chunk_bytes // sources[0].element_size())
    accumulate = functools.reduce(torch.promote_types, [source.dtype for source in sources], torch.float32)
    used = [seed_index] if rule == "seed" else list(range(len(sources)))
    for begin in range(0, numel, step):
        end = min(begin + step, numel)
        chunks = {j: sources[j][begin:end] for j in used}
        if rule == "mean":
            total = chunks[0].to(accumulate, copy=True)  # a copy: the sources are never written
            for j in range(1, len(sources)):
                total.add_(chunks[j])  # in place: one chunk of scratch memory, whatever N
            flat[0, begin:end] = total.div_(len(sources))
        elif rule == "seed":
            flat[:, begin:end] = chunks[seed_index]
        else:
            for slot in range(slots):
                flat[slot, begin:end] = chunks[slot if slot < len(sources) else seed_index]
        if release is not None:
            for j, chunk in chunks.items():
                release(j, chunk)


def _rule(key: str, method: str) -> str:
    """How one mixture key is filled: 'router', 'experts', 'mean' or 'seed'."""
    if key.endswith("router.weight"):
        return "router"
    if method == "sparse":
        return "seed"
    if ".ffn." in key:
        return "experts"
    if ".attn." in key:
        projection = key.rsplit(".", 1)[1]
        if method == "bam" or (method == "bam_shared_kv" and projection in QUERY_SIDE):
            return "experts"
    return "mean"


def _router(shape: torch.Size, config: ModelConfig, generator: torch.Generator) -> Tensor:
    if config.router_init == "zeros":
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * config.router_init_std


# ----- from checkpoint files -----
def read_sources(paths: Sequence[str | os.PathLike], moe_config: ModelConfig, method: str, *,
                 seed_index: int = 0, tokenizer: str | None = None) -> list[SourceCheckpoint]:
    """Read and validate dense checkpoints: each is dense, their architectures agree with each
    other and with the mixture, their tokenizers agree, and their tensors pass `validate_sources`."""
    paths = [str(p) for p in paths]
    check_method(method, len(paths), moe_config, seed_index)
    checkpoints = [read_checkpoint(path) for path in paths]
    first = checkpoints[0]
    for source in checkpoints:
        if source.config.is_moe:
            raise ValueError(f"{source.path}: is a mixture checkpoint, expected dense (n_experts="
                             f"{source.config.n_experts}, attn_experts={source.config.attn_experts})")
        for other, what in ((first.config, f"the first source {first.path}"), (moe_config, "the mixture config")):
            problem = _architecture_mismatch(source.config, other)
            if problem:
                raise ValueError(f"{source.path}: does not match {what}: {problem}")
        wanted = tokenizer or first.tokenizer
        if wanted and source.tokenizer and source.tokenizer != wanted:
            raise ValueError(f"{source.path}: trained with tokenizer {source.tokenizer!r}, expected {wanted!r}")
    validate_sources([c.state_dict for c in checkpoints], moe_config, method,
                     seed_index=seed_index, sources=paths)
    return checkpoints


def upcycle_from_checkpoints(paths: Sequence[str | os.PathLike], moe_config: ModelConfig, method: str, *,
                             seed_index: int = 0, router_seed: int = 0, tokenizer: str | None = None,
                             out: Mapping[str, Tensor] | None = None, chunk_bytes: int = CHUNK_BYTES,
                             ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read, validate and upcycle dense checkpoints; returns (mixture state dict, provenance).

    The sources are memory-mapped and streamed: each one's pages are given back as soon as a
    chunk is used, so peak memory is about the mixture's size (`out`: written in place).
    """
    checkpoints = read_sources(paths, moe_config, method, seed_index=seed_index, tokenizer=tokenizer)
    names = [c.path for c in checkpoints]
    state = upcycle([c.state_dict for c in checkpoints], moe_config, method, seed_index=seed_index,
                    router_seed=router_seed, sources=names, out=out,
                    release=lambda j, chunk: checkpoints[j].release(chunk), chunk_bytes=chunk_bytes)
    return state, provenance(names, moe_config, method, seed_index=seed_index, router_seed=router_seed)


def provenance(sources: Sequence[str], moe_config: ModelConfig, method: str, *, seed_index: int = 0,
               router_seed: int = 0) -> dict[str, Any]:
    """Which source became which expert (plain values: it is stored in checkpoints)."""
    sources = [str(s) for s in sources]
    seed = sources[seed_index]
    parts = {"bam": ["attention", "ffn"], "bam_shared_kv": ["attention_q_o", "ffn"]}.get(method, ["ffn"])
    experts = []
    for j in range(moe_config.n_experts):
        from_seed = method == "sparse" or j >= len(sources)  # sparse, or parameter-matched BTX extras
        experts.append({"index": j, "source": seed if from_seed else sources[j],
                        "parts": ["ffn"] if from_seed else parts})
    return {
        "method": method,
        "sources": sources,
        "seed": seed,
        "experts": experts,
        "shared_weights": f"copy of {seed}" if method == "sparse" else "mean of sources",
        "extra_ffn_experts_from": seed if method == "btx" and moe_config.n_experts > len(sources) else None,
        "router_init": moe_config.router_init,
        "router_seed": router_seed,
    }


# ----- helpers -----
def _architecture_mismatch(stored: ModelConfig, wanted: ModelConfig) -> str:
    """describe_config_mismatch restricted to ARCHITECTURE_FIELDS."""
    expected = dataclasses.replace(stored, **{name: getattr(wanted, name) for name in ARCHITECTURE_FIELDS})
    return describe_config_mismatch(stored, expected)


def _shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Every state-dict key of a GPT with `config` and its shape, without allocating weights."""
    with torch.device("meta"):
        model = GPT(config)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def _source_names(dense_state_dicts: Sequence[Mapping[str, Tensor]], sources: Sequence[str] | None) -> list[str]:
    if sources is None:
        return [f"source {j}" for j in range(len(dense_state_dicts))]
    if len(sources) != len(dense_state_dicts):
        raise ValueError(f"{len(sources)} source names for {len(dense_state_dicts)} state dicts")
    return [str(s) for s in sources]


def _sizes(name: str, state: Mapping[str, Tensor]) -> dict[str, int]:
    """Vocabulary and layer count read off the tensors, so a mismatch is reported by its field
    rather than as a pile of shape or key errors."""
    if "tok_emb.weight" not in state:
        raise KeyError(f"{name}: missing key 'tok_emb.weight'")
    layers = {int(key.split(".")[1]) for key in state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    return {"vocab_size": state["tok_emb.weight"].shape[0], "n_layer": 1 + max(layers, default=-1)}


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""

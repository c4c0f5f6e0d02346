"""`bam export CKPT --out DIR`: a checkpoint becomes a Hugging Face model folder.

Which home a model gets (`AutoModelForCausalLM.from_pretrained(DIR)` loads all of them):
- a dense model whose architecture is one family's (interop/names.py `family_of`: the fields
  that family's import sets) -> that family's native class: `LlamaForCausalLM`,
  `MistralForCausalLM`, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `GPTNeoXForCausalLM`;
- an FFN-only mixture (BTX, sparse, parameter-matched BTX) of a Llama or Qwen2 seed -> native
  `Qwen2MoeForCausalLM`, of a Qwen3 seed -> `Qwen3MoeForCausalLM`: both hold the paper's gate and
  the renormalised one (`norm_topk_prob`), Qwen2MoE's shared expert gets width 0, and
  `ffn_gate_scale` is folded into the down projections (the gate weights multiply each expert's
  output linearly, so scaling W_down is exact);
- anything else (BAM's attention experts, parallel blocks, Mistral or GPT-NeoX mixtures) -> our
  own remote-code package (`configuration_bam.py`, `modeling_bam.py`), loaded with
  `trust_remote_code=True`.

The folder gets `model.safetensors` (written tensor by tensor), `config.json`, the tokenizer
files, a `generation_config.json` and a model card (`README.md`: method, sources, which source
became which expert, validation numbers). The folder is built beside its target and renamed
into place, so an existing export is never left half-replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from bam_lightning.checkpoint import SourceCheckpoint, read_checkpoint, staging_directory
from bam_lightning.config import ModelConfig
from bam_lightning.data.hf_tokenizer import HFTokenizer, eos_token_of, find_tokenizer_json
from bam_lightning.errors import UserError
from bam_lightning.interop.hf_import import TOKENIZER_DIR_KEY, TOKENIZER_FILES
from bam_lightning.interop.names import HF, dense_name_map, family_of, fused_part, is_banked
from bam_lightning.interop.safetensors_stream import (
    PlannedTensor,
    progress_printer,
    write_safetensors,
)

DENSE_TARGETS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}
MOE_TARGETS = {"qwen2_moe": ("Qwen2MoeForCausalLM", ("llama", "qwen2")), "qwen3_moe": ("Qwen3MoeForCausalLM", ("qwen3",))}
TARGETS = ("auto", *DENSE_TARGETS, *MOE_TARGETS, "bam")
CLASS_NAMES = {**DENSE_TARGETS, **{name: cls for name, (cls, _) in MOE_TARGETS.items()}, "bam": "BamForCausalLM"}
REMOTE_CODE_FILES = ("configuration_bam.py", "modeling_bam.py")


def choose_target(config: ModelConfig, wanted: str = "auto") -> str:
    """The native class that holds `config` exactly, else our remote code; a forced `wanted` that
    cannot hold it is an error naming the field."""
    family = family_of(config)
    why_family = _why_not_family(config, family)
    possible = {"bam": ""}
    for target, class_name in DENSE_TARGETS.items():
        if config.is_moe:
            possible[target] = (f"n_experts={config.n_experts}, attn_experts={config.attn_experts}: "
                                f"{class_name} is dense")
        else:
            possible[target] = "" if family == target else why_family(target)
    for target, (class_name, families) in MOE_TARGETS.items():
        if config.attn_experts:
            possible[target] = f"attn_experts={config.attn_experts}: {class_name} has one attention"
        elif not config.n_experts:
            possible[target] = f"n_experts=0: a dense model exports as {family}"
        elif family not in families:
            possible[target] = why_family(families[-1])
        elif config.ffn_bias or config.ffn_activation != "swiglu" or (target == "qwen2_moe" and config.attn_out_bias):
            possible[target] = f"ffn_bias={config.ffn_bias}, attn_out_bias={config.attn_out_bias}: {class_name} has none"
        else:
            possible[target] = ""
    if wanted == "auto":
        return next(t for t in (*DENSE_TARGETS, *MOE_TARGETS, "bam") if not possible[t])
    if wanted not in possible:
        raise UserError(f"--format must be one of {list(TARGETS)}, got {wanted!r}")
    if possible[wanted]:
        raise UserError(f"cannot export as {wanted}: {possible[wanted]}")
    return wanted


def _why_not_family(config: ModelConfig, family: str):
    def why(target: str) -> str:
        if target != "gpt_neox" and not (config.block_layout == "sequential" and config.norm == "rmsnorm"):
            return f"block_layout={config.block_layout!r}, norm={config.norm!r} (needs sequential + rmsnorm)"
        fields = ("block_layout", "parallel_ffn_norm", "norm", "norm_bias", "ffn_activation", "ffn_bias", "qkv_bias",
                  "attn_out_bias", "qk_norm", "sliding_window", "rotary_dim", "rope_scaling_type")
        shown = ", ".join(f"{name}={getattr(config, name)!r}" for name in fields)
        return f"the architecture ({shown}) is {family!r}'s, not {target!r}'s"

    return why


def export_hf(src: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
              target: str = "auto", dtype: torch.dtype | None = None, overwrite: bool = False,
              progress: bool = True) -> Path:
    """Export our `.ckpt` or `.safetensors` checkpoint as a Hugging Face folder; returns it.

    `tokenizer`: a tokenizer.json (or folder) to ship; default: the one recorded by
    `bam import-hf` for this checkpoint or, for a trained stage, for the checkpoint it started
    from (its upcycling sources or `init_from`). Its fingerprint must match the checkpoint's.
    """
    src, out_dir = Path(src).expanduser(), Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; the export is a folder (name a new or empty folder)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    checkpoint = read_checkpoint(src)
    config = checkpoint.config
    kind = choose_target(config, target)
    info = checkpoint_info(src)
    token_json = _resolve_tokenizer(src, checkpoint, tokenizer)
    out_dtype = dtype or checkpoint.state_dict["tok_emb.weight"].dtype
    planned = plan_tensors(kind, checkpoint, out_dtype)
    hf_config = native_config(kind, config) if kind != "bam" else bam_config(config)
    special = _special_ids(token_json)
    hf_config.update(special, dtype=str(out_dtype).removeprefix("torch."))
    staging = staging_directory(out_dir.parent, f".{out_dir.name}.")
    try:
        report = progress_printer(f"[bam export] exporting {src.name} as {kind}") if progress else None
        write_safetensors(staging / "model.safetensors", planned, {"format": "pt"}, report)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (staging / "generation_config.json").write_text(json.dumps({**special, "do_sample": False}, indent=2) + "\n")
        if kind == "bam":
            package = resources.files("bam_lightning.interop.remote_code")
            for name in REMOTE_CODE_FILES:
                (staging / name).write_text(package.joinpath(name).read_text())
        if token_json is not None:
            for name in TOKENIZER_FILES:
                if (token_json.parent / name).is_file():
                    shutil.copy2(token_json.parent / name, staging / name)
            if kind == "bam":  # AutoTokenizer reads auto_map too; without one it uses the fast class
                _tokenizer_config_without_auto_map(staging)
        (staging / "README.md").write_text(model_card(src, config, kind, info, token_json, checkpoint.tokenizer))
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"[bam export] {out_dir} ({kind}{'' if kind != 'bam' else ', trust_remote_code=True'})", flush=True)
    return out_dir


# ----- tensors -----
def plan_tensors(kind: str, checkpoint: SourceCheckpoint, dtype: torch.dtype) -> list[PlannedTensor]:
    state, config = checkpoint.state_dict, checkpoint.config

    def planned(name: str, make, shape) -> PlannedTensor:
        return PlannedTensor(name, tuple(shape), dtype, lambda: make().to(dtype))

    def ours(key: str, squeeze: bool = False) -> tuple:
        tensor = state[key]
        shape = tuple(tensor.shape[1:]) if squeeze else tuple(tensor.shape)
        return (lambda: tensor.reshape(shape)), shape

    if kind == "bam":
        return [planned(key, *ours(key)) for key in state]
    family = kind if kind in DENSE_TARGETS else "llama"
    names = dense_name_map(config, HF, family)
    tensors = []
    for key, theirs in names.items():
        if kind in MOE_TARGETS and ".ffn." in key:
            continue
        part = fused_part(key, family)
        if part is None:
            tensors.append(planned(theirs, *ours(key, squeeze=is_banked(key))))
        elif part == 0:  # GPT-NeoX: q, k, v interleaved per head in one tensor
            parts = [state[key[:-1] + letter][0] for letter in "qkv"]
            shape = (3 * parts[0].shape[0], *parts[0].shape[1:])

            def fused(parts=parts, shape=shape):
                return torch.stack([p.reshape(config.n_head, config.head_dim, -1) for p in parts], dim=1).reshape(shape)

            tensors.append(planned(theirs, fused, shape))
    if kind in MOE_TARGETS:
        d, f, E = config.d_model, config.d_ff, config.n_experts
        for i in range(config.n_layer):
            prefix, mine = f"model.layers.{i}.mlp.", f"blocks.{i}.ffn."
            gate, up, down = state[mine + "w_gate"], state[mine + "w_up"], state[mine + "w_down"]
            scale = config.ffn_gate_scale
            tensors += [
                planned(prefix + "gate.weight", *ours(mine + "router.weight")),
                planned(prefix + "experts.gate_up_proj", lambda g=gate, u=up: torch.cat([g, u], dim=1), (E, 2 * f, d)),
                planned(prefix + "experts.down_proj", lambda w=down, s=scale: w.float() * s, (E, d, f)),
            ]
            if kind == "qwen2_moe":  # its shared expert is always built: width 0
                tensors += [
                    planned(prefix + "shared_expert.gate_proj.weight", lambda: torch.zeros(0, d), (0, d)),
                    planned(prefix + "shared_expert.up_proj.weight", lambda: torch.zeros(0, d), (0, d)),
                    planned(prefix + "shared_expert.down_proj.weight", lambda: torch.zeros(d, 0), (d, 0)),
                    planned(prefix + "shared_expert_gate.weight", lambda: torch.zeros(1, d), (1, d)),
                ]
    return tensors


# ----- config.json -----
def _rope_parameters(config: ModelConfig) -> dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": config.rope_base}
    if config.rope_scaling is not None:
        scaling = dict(config.rope_scaling)
        rope["rope_type"] = scaling.pop("type")
        rope.update(scaling)
    if config.rotary_dim != config.head_dim:
        rope["partial_rotary_factor"] = config.rotary_dim / config.head_dim
    return rope


def _llama_common(config: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_parameters": _rope_parameters(config),
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0, "use_cache": True,
    }


def native_config(kind: str, config: ModelConfig) -> dict[str, Any]:
    """config.json for a native transformers class (`kind` from `choose_target`)."""
    head = {"architectures": [CLASS_NAMES[kind]], "model_type": kind}
    if kind == "gpt_neox":
        return {**head, "vocab_size": config.vocab_size, "hidden_size": config.d_model,
                "intermediate_size": config.d_ff, "num_hidden_layers": config.n_layer,
                "num_attention_heads": config.n_head, "max_position_embeddings": config.max_seq_len,
                "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[config.ffn_activation],
                "layer_norm_eps": config.norm_eps, "rope_parameters": _rope_parameters(config),
                "rotary_pct": config.rotary_dim / config.head_dim, "rotary_emb_base": config.rope_base,
                "use_parallel_residual": config.block_layout == "parallel", "attention_bias": config.qkv_bias,
                "tie_word_embeddings": config.tie_embeddings, "use_cache": True}
    values = {**head, **_llama_common(config)}
    if kind == "llama":
        values.update(attention_bias=config.qkv_bias, mlp_bias=config.ffn_bias)
    elif kind == "mistral":
        values.update(sliding_window=config.sliding_window)
    elif kind in ("qwen2", "qwen3", "qwen3_moe"):
        values.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer,
                      layer_types=["full_attention"] * config.n_layer)
        if kind != "qwen2":
            values["attention_bias"] = config.qkv_bias
    if kind in MOE_TARGETS:
        values.update(moe_intermediate_size=config.d_ff, num_experts=config.n_experts,
                      num_local_experts=config.n_experts, num_experts_per_tok=config.ffn_top_k,
                      norm_topk_prob=config.ffn_renormalize, decoder_sparse_step=1, mlp_only_layers=[],
                      output_router_logits=False)
    if kind == "qwen2_moe":
        values.update(shared_expert_intermediate_size=0, qkv_bias=config.qkv_bias, use_sliding_window=False)
    return values


def bam_config(config: ModelConfig) -> dict[str, Any]:
    from bam_lightning.interop.remote_code.configuration_bam import BamConfig

    values = config.to_dict()
    # names transformers would act on: it rewrites `rope_scaling`, and a `sliding_window` makes
    # generate() build a cache that keeps only the window (our keys are all kept and masked)
    values["rope_scaling_bam"] = values.pop("rope_scaling")
    values["sliding_window_bam"] = values.pop("sliding_window")
    fields = {name: value for name, value in values.items() if name in BamConfig.__init__.__code__.co_varnames}
    return {"architectures": ["BamForCausalLM"], "model_type": "bam",
            "auto_map": {"AutoConfig": "configuration_bam.BamConfig",
                         "AutoModelForCausalLM": "modeling_bam.BamForCausalLM"}, **fields}


# ----- tokenizer -----
def checkpoint_info(path: Path) -> dict[str, Any]:
    """What a checkpoint says about where it came from: upcycling provenance, init_from, import
    source, tokenizer folder, initial validation metrics."""
    info: dict[str, Any] = {}
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            metadata = json.loads(handle.read(size)).get("__metadata__") or {}
        if metadata.get(TOKENIZER_DIR_KEY):
            info["tokenizer_dir"] = str(path.parent / metadata[TOKENIZER_DIR_KEY])
        info["imported_from"] = metadata.get("bam_lightning.imported_from")
        return info
    raw = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for name, state in (raw.get("callbacks") or {}).items():
        if name.startswith("UpcyclingCallback") and isinstance(state, dict):
            info["provenance"] = state.get("upcycled_from")
            info["function_preservation"] = state.get("function_preservation")
    info["init_from"] = (raw.get("hyper_parameters") or {}).get("init_from")
    info["initial_val_metrics"] = (raw.get("bam_lightning") or {}).get("initial_val_metrics") or {}
    result = path.parent.parent / "result.json"  # a pipeline stage's final numbers
    if result.is_file():
        info["final_val_metrics"] = json.loads(result.read_text()).get("final", {})
    return info


def _resolve_tokenizer(src: Path, checkpoint: SourceCheckpoint, explicit: str | Path | None) -> Path | None:
    """The tokenizer.json to ship, checked against the checkpoint's fingerprint."""
    wanted = checkpoint.tokenizer
    if explicit is not None:
        path = find_tokenizer_json(explicit)
        if path is None:
            raise UserError(f"--tokenizer {explicit}: no tokenizer.json there")
        candidates = [path]
    else:
        candidates = [p for p in _recorded_tokenizers(src, depth=3) if p is not None]
    for path in candidates:
        if wanted is None or wanted in _fingerprints(path):
            return path
    if explicit is not None:
        raise UserError(f"--tokenizer {explicit}: its fingerprint {sorted(_fingerprints(candidates[0]))} is "
                         f"not the checkpoint's tokenizer {wanted!r}")
    return None


def _recorded_tokenizers(path: Path, depth: int):
    if depth == 0 or not path.is_file():
        return
    info = checkpoint_info(path)
    if info.get("tokenizer_dir"):
        yield find_tokenizer_json(info["tokenizer_dir"])
    sources = (info.get("provenance") or {}).get("sources") or []
    for source in [*sources, info.get("init_from")]:
        if source:
            yield from _recorded_tokenizers(Path(source), depth - 1)


def _fingerprints(path: Path) -> set[str]:
    """The fingerprints a tokenizer.json can have here: as a pretrained model's tokenizer, or as
    one of our trained BPEs."""
    prints = set()
    try:
        prints.add(HFTokenizer(path).fingerprint)
    except ValueError:
        pass
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path)).get_vocab_size()
    prints.add(f"bpe-{vocab}-{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}")
    return prints


def _special_ids(token_json: Path | None) -> dict[str, int]:
    if token_json is None:
        return {}
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(token_json))
    ids = {}
    config_path = token_json.with_name("tokenizer_config.json")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for role in ("bos", "eos", "pad"):
        token = eos_token_of(token_json) if role == "eos" else config.get(f"{role}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids[f"{role}_token_id"] = tokenizer.token_to_id(token)
    return ids


def _tokenizer_config_without_auto_map(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config.pop("auto_map", None)
        path.write_text(json.dumps(config, indent=2))


# ----- model card -----
FAMILY_NAMES = {"llama": "Llama (Llama 2/3.x, SmolLM2, ...)", "mistral": "Mistral", "qwen2": "Qwen2 / Qwen2.5",
                "qwen3": "Qwen3", "gpt_neox": "GPT-NeoX (Pythia)",
                "bam": "bam_lightning's own architecture (parallel block or fields no transformers family has)"}
METHOD_NAMES = {"bam": "BAM, Expert-KV attention experts", "bam_shared_kv": "BAM, Shared-KV attention experts",
                "btx": "BTX (FFN experts, averaged attention)", "sparse": "sparse upcycling (FFN experts)"}


def model_card(src: Path, config: ModelConfig, kind: str, info: dict[str, Any], token_json: Path | None,
               fingerprint: str | None) -> str:
    from bam_lightning.flops import parameter_counts

    provenance = info.get("provenance") or {}
    method = METHOD_NAMES.get(provenance.get("method"), "dense" if not config.is_moe else "mixture")
    total, active = parameter_counts(config)
    home = ("remote code (`modeling_bam.py`), load with `trust_remote_code=True`" if kind == "bam"
            else f"native `{CLASS_NAMES[kind]}`")
    family = family_of(config)
    remote = ", trust_remote_code=True" if kind == "bam" else ""
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [bam_lightning, " + ("mixture-of-experts" if config.is_moe else "dense") + "]", "---", "",
             f"# {src.stem}", "", f"Exported by bam_lightning from `{src}` as {home}.", "",
             "| | |", "|---|---|", f"| method | {method} |",
             f"| parameters | {total / 1e6:.1f}M total, {active / 1e6:.1f}M active per token |",
             f"| layers / width / heads | {config.n_layer} / {config.d_model} / {config.n_head} "
             f"({config.n_kv_head} KV) |",
             f"| block | {config.block_layout}, {config.norm} |",
             f"| seed family | {FAMILY_NAMES.get(family, family)} |"]
    if config.n_experts:
        gate = "renormalised top-k" if config.ffn_renormalize else "softmax then top-k (no renormalisation)"
        lines.append(f"| FFN experts | {config.n_experts}, top-{config.ffn_top_k}, {gate}, "
                     f"gate scale {config.ffn_gate_scale:g} |")
    if config.attn_experts:
        lines.append(f"| attention experts | {config.attn_experts}, {config.attn_routing} routing, "
                     f"{'Shared-KV' if config.attn_shared_kv else 'Expert-KV'} |")
    lines.append(f"| tokenizer | {fingerprint or 'not recorded'}"
                 f"{'' if token_json else ' (no tokenizer files shipped)'} |")
    preserved = info.get("function_preservation")
    if preserved:
        lines.append(f"| validation loss at initialisation | {preserved['mixture_val_loss']:.4f} "
                     f"(its seed: {preserved['seed_val_loss']:.4f}) |")
    if info.get("imported_from"):
        lines.append(f"| imported from | `{info['imported_from']}` |")
    if provenance:
        lines += ["", "## Sources", "", f"Seed: `{provenance.get('seed')}`; shared weights: "
                  f"{provenance.get('shared_weights')}; routers: {provenance.get('router_init')} "
                  f"(seed {provenance.get('router_seed')}).", "", "| expert | source | parts |", "|---|---|---|"]
        lines += [f"| {e['index']} | `{e['source']}` | {', '.join(e['parts'])} |" for e in provenance.get("experts", [])]
    initial, final = info.get("initial_val_metrics") or {}, info.get("final_val_metrics") or {}
    keys = sorted(k for k in set(initial) | set(final) if k.endswith(("/ppl", "/loss")))
    if keys:
        lines += ["", "## Validation", "", "| metric | at initialisation | final |", "|---|---|---|"]
        lines += [f"| {k} | {_number(initial.get(k))} | {_number(final.get(k))} |" for k in keys]
    lines += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              f'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder"{remote})',
              f'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder"{remote})', "```", ""]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"


# ----- helpers -----
def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished folder over `out_dir`; an old export is removed only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bam export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="our checkpoint (.ckpt or .safetensors)")
    parser.add_argument("--out", required=True, help="the Hugging Face folder to write")
    parser.add_argument("--tokenizer", help="tokenizer.json (or its folder) to ship; default: the one "
                        "recorded by `bam import-hf` for the checkpoint or its sources")
    parser.add_argument("--format", default="auto", choices=TARGETS, help="auto: the seed family's native "
                        "class for dense models, qwen2_moe / qwen3_moe for FFN-only mixtures they hold, "
                        "bam (remote code) for the rest")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    args = parser.parse_args(argv)
    export_hf(args.checkpoint, args.out, tokenizer=args.tokenizer, target=args.format,
              dtype=DTYPES.get(args.dtype), overwrite=args.overwrite)

"""`bam import-hf SRC --out CKPT`: a pretrained model becomes a dense seed checkpoint.

SRC is a Hugging Face folder (`config.json` + `*.safetensors`, sharded or not) of a Llama
(incl. 3.x RoPE scaling), Mistral, Qwen2/2.5, Qwen3 or GPT-NeoX (Pythia) model, or a Llama
`.gguf` file (incl. llama.cpp's `rope_freqs` scaling). The result is a self-describing `.safetensors` seed (`block_layout: sequential`, the
model's GQA, tying, RoPE base and norm epsilon in its metadata, like any checkpoint we write)
and the model's tokenizer in a folder beside it (`<name>.tokenizer/`), whose fingerprint the
checkpoint records. Everything is checked before a tensor is read: an architecture or feature
ModelConfig cannot express is refused with the config field that says so, a tokenizer larger
than the embedding is refused, a missing tensor is named, and so is a source tensor the plan has
no place for (dropping it would import a different model). Tensors are then read one at a time
(memory-mapped safetensors; GGUF blocks dequantised per tensor) and written as they come, so
peak memory is about one tensor, not the model.

GGUF stores the query and key rows of each head in llama.cpp's interleaved-pair order for its
rotary embedding; both Hugging Face and we rotate (first half, second half), so those rows are
put back per head on import (without it the model runs, wrongly, with no error anywhere).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bam_lightning.checkpoint import SAFETENSORS_CONFIG_KEY, SAFETENSORS_DTYPES, staging_directory
from bam_lightning.config import ModelConfig
from bam_lightning.data.hf_tokenizer import TOKENIZER_CONFIG_FILE, HFTokenizer
from bam_lightning.errors import UserError
from bam_lightning.interop.names import (
    DERIVED_SUFFIXES,
    GGUF,
    HF,
    dense_name_map,
    fused_part,
    is_banked,
    our_keys,
)
from bam_lightning.interop.safetensors_stream import (
    PlannedTensor,
    progress_printer,
    write_safetensors,
)

TOKENIZER_DIR_KEY = "bam_lightning.tokenizer_dir"  # metadata: the tokenizer folder, relative to the file
IMPORTED_FROM_KEY = "bam_lightning.imported_from"
# config.json model_type -> the name table it uses (interop/names.py)
FAMILY_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
                        "gpt_neox": "gpt_neox"}
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
# llama.cpp architectures: llama's q/k rows are stored permuted for its interleaved rotary, qwen2
# and qwen3 rotate halves as we do and are stored as they are (transformers' GGUF loader agrees)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja")


@dataclass
class SourceTensor:
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]  # reads (and dequantises) the tensor; called once


@dataclass
class ImportPlan:
    """Everything known before any tensor is read."""

    config: ModelConfig
    tensors: dict[str, SourceTensor]  # our key -> source tensor (those the source has)
    names: dict[str, str]  # our key -> the source's name for it (for error messages)
    write_tokenizer: Callable[[Path], None]  # writes the tokenizer files into a folder
    source: str


def import_hf(src: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
              max_seq_len: int | None = None, progress: bool = True) -> Path:
    """Import a Hugging Face Llama-family folder or a `.gguf` file as a dense seed; returns `out`.

    `dtype`: the weights' dtype in the checkpoint (default: the source's; GGUF: float32).
    `max_seq_len`: the context recorded in the config (default: the source's).
    """
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the imported seed is written as a .safetensors file")
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    started = time.perf_counter()
    plan = plan_gguf(src) if src.suffix == ".gguf" else plan_hf_folder(src)
    if max_seq_len is not None:
        plan.config.max_seq_len = max_seq_len
    shapes = _check_all_present(plan, src)
    token_dir = out.with_name(out.stem + ".tokenizer")
    staging = staging_directory(out.parent, f".{out.stem}.tokenizer.")
    try:
        plan.write_tokenizer(staging)
        tokenizer = HFTokenizer(staging / "tokenizer.json")
        if tokenizer.vocab_size > plan.config.vocab_size:
            raise UserError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
                             f"vocab_size {plan.config.vocab_size} (embedding rows): it does not fit this model")
        metadata = {SAFETENSORS_CONFIG_KEY: json.dumps(plan.config.to_dict()),
                    "bam_lightning.tokenizer": tokenizer.fingerprint,
                    TOKENIZER_DIR_KEY: token_dir.name, IMPORTED_FROM_KEY: str(src), "format": "pt"}
        planned = [_planned(key, plan.tensors[key], shape, dtype) for key, shape in shapes.items()]
        report = progress_printer(f"[bam import-hf] importing {src.name}") if progress else None
        write_safetensors(out, planned, metadata, report)
        if token_dir.exists():
            shutil.rmtree(token_dir)
        staging.rename(token_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"[bam import-hf] {out} ({sum(math.prod(p.shape) for p in planned) / 1e6:.1f}M parameters, "
              f"{time.perf_counter() - started:.1f} s); tokenizer {token_dir} ({tokenizer.fingerprint})\n"
              f"model config for a recipe:\n{json.dumps(plan.config.to_dict())}", flush=True)
    return out


# ----- Hugging Face folders -----
def plan_hf_folder(folder: Path) -> ImportPlan:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json (expected a Hugging Face model folder or a .gguf file)")
    hf = json.loads(config_path.read_text())
    config = config_from_hf(hf, str(config_path))
    family = FAMILY_OF_MODEL_TYPE[hf["model_type"]]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (pytorch_model.bin is not read: "
                                "it would need unpickling)")
    tensors: dict[str, tuple[Path, str, tuple[int, ...], torch.dtype]] = {}
    for file in files:
        for name, (shape, dtype) in _safetensors_header(file).items():
            tensors[name] = (file, name, shape, dtype)
    names = dense_name_map(config, HF, family)
    if family == "gpt_neox" and names.get("lm_head.weight") not in tensors and "lm_head.weight" in tensors:
        names["lm_head.weight"] = "lm_head.weight"  # transformers 5.x's name for embed_out
    ignorable = {"lm_head.weight", "embed_out.weight"} if config.tie_embeddings else set()
    _refuse_unmapped([name for name in tensors if name not in ignorable and not name.endswith(DERIVED_SUFFIXES)],
                     names, folder, "config.json")
    plan = {}
    for ours, theirs in names.items():
        if theirs not in tensors:
            continue
        file, name, shape, dtype = tensors[theirs]
        part = fused_part(ours, family)
        load = _safetensors_loader(file, name)
        if part is not None:
            shape, load = _fused_slice(shape, part, config.n_head, load)
        plan[ours] = SourceTensor(shape, dtype, load)
    return ImportPlan(config, plan, names, lambda out: _hf_tokenizer(folder, hf, out), str(folder))


def _refuse_unmapped(theirs: list[str], names: dict[str, str], where, fix: str) -> None:
    """Any source tensor the plan does not read is an error: dropping it silently would import a
    different model."""
    mapped = set(names.values())
    unmapped = sorted(name for name in theirs if name not in mapped)
    if unmapped:
        more = f" (and {len(unmapped) - 1} more)" if len(unmapped) > 1 else ""
        raise UserError(f"{where}: tensor {unmapped[0]!r}{more} has no place in the model its {fix} describes; "
                        "importing without it would give a different model")


def _fused_slice(shape: tuple[int, ...], part: int, heads: int, load: Callable[[], torch.Tensor]):
    """q (part 0), k (1) or v (2) of GPT-NeoX's fused query_key_value, whose rows are
    [head, (q, k, v), head_dim]; returns (shape, loader)."""
    rows = shape[0] // 3
    out_shape = (rows, *shape[1:])

    def sliced() -> torch.Tensor:
        fused = load()
        return fused.reshape(heads, 3, rows // heads, *shape[1:])[:, part].reshape(out_shape).contiguous()

    return out_shape, sliced


def _safetensors_loader(file: Path, name: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as handle:
            return handle.get_tensor(name)

    return load


# transformers 5.24's MistralConfig default: a config.json without the key gets this window
MISTRAL_DEFAULT_SLIDING_WINDOW = 4096


def config_from_hf(hf: dict, where: str) -> ModelConfig:
    """ModelConfig for a supported `config.json`; refuses what it cannot express, naming the field."""
    model_type = hf.get("model_type")
    if model_type not in FAMILY_OF_MODEL_TYPE:
        raise UserError(f"{where}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not "
                        f"supported; model types that load: {list(FAMILY_OF_MODEL_TYPE)}")

    def refuse(field: str, why: str) -> None:
        raise UserError(f"{where}: {field} = {hf.get(field)!r}: {why}; ModelConfig cannot express it")

    for field in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if field not in hf:
            raise UserError(f"{where}: config.json has no {field!r}")
    d_model, n_head = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or d_model // n_head
    rope = dict(hf.get("rope_parameters") or {})
    rope.update(hf.get("rope_scaling") or {})  # transformers 4.x's name for the scaling part
    kind = rope.get("rope_type", rope.get("type", "default"))
    rotary_fraction = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor",
                                                                     hf.get("rotary_pct", 1.0))))
    rotary_dim = int(head_dim * rotary_fraction)
    scaling = None
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(rope["factor"])}
    elif kind == "llama3":
        scaling = {"type": "llama3", **{key: float(rope[key]) for key in
                                        ("factor", "low_freq_factor", "high_freq_factor")},
                   "original_max_position_embeddings": int(rope["original_max_position_embeddings"])}
    elif kind != "default":
        refuse("rope_parameters", f"rope_type {kind!r}: only plain, linear and llama3 RoPE exist here")
    for field in ("layer_types",):
        if any(layer != "full_attention" for layer in hf.get(field) or []):
            refuse(field, "per-layer attention types (sliding layers) are not supported")
    if hf.get("use_sliding_window"):
        refuse("use_sliding_window", "per-layer sliding windows (max_window_layers) are not supported")
    values = dict(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=d_model, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, d_ff=hf["intermediate_size"], head_dim=head_dim,
        rotary_dim=rotary_dim, rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if model_type == "gpt_neox":
        activation = GELU_NAMES.get(hf.get("hidden_act", "gelu"))
        if activation is None:
            refuse("hidden_act", f"the GPT-NeoX MLP here is one of {sorted(GELU_NAMES)}")
        if hf.get("num_key_value_heads") not in (None, n_head):
            refuse("num_key_value_heads", "GPT-NeoX has no grouped-query attention")
        bias = bool(hf.get("attention_bias", True))
        parallel = bool(hf.get("use_parallel_residual", True))
        values.update(norm="layernorm", norm_bias=True, norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
                      block_layout="parallel" if parallel else "sequential", parallel_ffn_norm=parallel,
                      ffn_activation=activation, ffn_bias=True, qkv_bias=bias, attn_out_bias=bias)
    else:
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "the Llama-family FFN here is SwiGLU (silu)")
        if rotary_dim != head_dim:
            refuse("rope_parameters", "partial rotary in a Llama-family model is not supported")
        attention_bias = bool(hf.get("attention_bias", False))
        values.update(norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), block_layout="sequential",
                      qkv_bias=attention_bias or model_type == "qwen2",
                      attn_out_bias=attention_bias and model_type != "qwen2",
                      qk_norm=model_type == "qwen3", ffn_bias=bool(hf.get("mlp_bias", False)))
        if model_type == "mistral":
            window = hf.get("sliding_window", MISTRAL_DEFAULT_SLIDING_WINDOW)
            values["sliding_window"] = int(window) if window else None
    try:
        return ModelConfig(**values)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from error


def _hf_tokenizer(folder: Path, hf: dict, out: Path) -> None:
    """Copy the tokenizer files; a folder with only a SentencePiece model is converted once by
    transformers. The EOS is made explicit in tokenizer_config.json (data uses it as separator)."""
    if (folder / "tokenizer.json").is_file():
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, out / name)
    else:
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(out))
        except Exception as error:
            raise UserError(f"{folder}: no tokenizer.json, and transformers could not build one "
                                    f"({type(error).__name__}: {error})") from error
    eos_id = hf.get("eos_token_id")
    _set_eos(out, eos_id[0] if isinstance(eos_id, list) else eos_id)


def _set_eos(folder: Path, eos_id: int | None) -> None:
    """Record the model's EOS token text in tokenizer_config.json unless it is there already."""
    config_path = folder / TOKENIZER_CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("eos_token") or eos_id is None:
        return
    from tokenizers import Tokenizer

    token = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(int(eos_id))
    if token is not None:
        config["eos_token"] = token
        config_path.write_text(json.dumps(config, indent=2))


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    try:
        with open(file, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        header.pop("__metadata__", None)
        return {name: (tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]]) for name, entry in header.items()}
    except Exception as error:
        raise UserError(f"{file}: not a readable safetensors file ({type(error).__name__}: {error})") from error


# ----- GGUF -----
SUPPORTED_GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def plan_gguf(path: Path) -> ImportPlan:
    try:
        from gguf import GGUFReader
    except ImportError as error:
        raise ImportError("importing .gguf needs the `gguf` package: pip install 'bam_lightning[hf]'") from error
    try:
        reader = GGUFReader(str(path))
    except Exception as error:
        raise UserError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from error
    meta = {name: _field_value(field) for name, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"{path}: general.architecture {arch!r} is not supported; architectures that load: "
                         f"{list(GGUF_ARCHITECTURES)}")
    tensors = {t.name: t for t in reader.tensors}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in SUPPORTED_GGUF_TYPES:
            raise UserError(f"{path}: tensor {tensor.name!r} uses quantisation {kind}, which is not supported "
                             f"(supported: {', '.join(SUPPORTED_GGUF_TYPES)})")
    config = config_from_gguf(meta, tensors, str(path))
    names = dense_name_map(config, GGUF, "llama")
    _refuse_unmapped([name for name in tensors if name != ROPE_FREQS], names, path, "GGUF metadata")
    heads = {"attn.wq": config.n_head, "attn.wk": config.n_kv_head} if arch == "llama" else {}
    plan = {}
    for ours, theirs in names.items():
        if theirs in tensors:
            tensor = tensors[theirs]
            shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest first
            permuted = heads.get(ours.split(".", 2)[-1])
            plan[ours] = SourceTensor(shape, torch.float32, _gguf_loader(tensor, shape, permuted))
    return ImportPlan(config, plan, names, lambda out: _gguf_tokenizer(path, meta, out), str(path))


ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama 3.x RoPE scaling: one divisor per frequency


def config_from_gguf(meta: dict, tensors: dict, where: str) -> ModelConfig:
    arch = meta["general.architecture"]

    def need(key: str):
        if f"{arch}.{key}" not in meta:
            raise UserError(f"{where}: GGUF metadata has no {arch}.{key!r}")
        return meta[f"{arch}.{key}"]

    d_model, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or d_model // n_head)
    for key in ("rope.dimension_count", "attention.value_length"):
        value = meta.get(f"{arch}.{key}")
        if value is not None and int(value) != head_dim:
            raise UserError(f"{where}: {arch}.{key} = {value}, but the head size is {head_dim} "
                            "(attention.key_length, else embedding_length / head_count)")
    kind = meta.get(f"{arch}.rope.scaling.type")
    scaling = None
    if kind == "linear":
        scaling = {"type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise UserError(f"{where}: {arch}.rope.scaling.type = {kind!r}: only plain, linear and llama3 "
                        f"({ROPE_FREQS}) RoPE exist here")
    if ROPE_FREQS in tensors:
        if scaling is not None:
            raise UserError(f"{where}: both {arch}.rope.scaling.type = {kind!r} and tensor {ROPE_FREQS!r}")
        factors = _gguf_loader(tensors[ROPE_FREQS], (-1,), None)()
        if factors.numel() != head_dim // 2:
            raise UserError(f"{where}: tensor {ROPE_FREQS!r} has {factors.numel()} values, the head size "
                            f"{head_dim} has {head_dim // 2} frequencies")
        scaling = _llama3_matching(factors, head_dim, float(meta.get(f"{arch}.rope.freq_base", 10000.0))) or {
            "type": "factors", "factors": factors.tolist()}
    if "token_embd.weight" not in tensors:
        raise UserError(f"{where}: missing tensor 'token_embd.weight'")
    return ModelConfig(
        vocab_size=int(tensors["token_embd.weight"].shape[-1]), n_layer=int(need("block_count")),
        d_model=d_model, n_head=n_head, n_kv_head=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        d_ff=int(need("feed_forward_length")), max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)), head_dim=head_dim, rope_scaling=scaling,
        tie_embeddings="output.weight" not in tensors, norm="rmsnorm",
        norm_eps=float(need("attention.layer_norm_rms_epsilon")), block_layout="sequential",
        # Qwen2 always has q/k/v biases; Qwen3 has q/k norms, and biases on all four when present
        qkv_bias=arch == "qwen2" or (arch == "qwen3" and "blk.0.attn_q.bias" in tensors),
        attn_out_bias=arch == "qwen3" and "blk.0.attn_q.bias" in tensors, qk_norm=arch == "qwen3")


# Llama 3.1 and 3.2's published scaling (their config.json): tried against a GGUF's rope_freqs so
# the import carries the named type (and exports to LlamaForCausalLM) when the factors are these
LLAMA3_PUBLISHED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_matching(factors: torch.Tensor, head_dim: int, base: float) -> dict | None:
    """The llama3 scaling whose frequencies are rope_freqs' (published low/high factors and
    original context, factor = the largest divisor), else None."""
    from bam_lightning.model.layers import scale_inv_freq

    candidate = {"type": "llama3", "factor": float(factors.max()), **LLAMA3_PUBLISHED}
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if torch.allclose(scale_inv_freq(inv_freq, candidate), inv_freq / factors.float(), rtol=1e-5, atol=0):
        return candidate
    return None


def _field_value(field):
    """A GGUF metadata value as a Python scalar, string or list (arrays of tokens stay unread)."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return None  # token lists etc.: only the tokenizer needs them, through transformers
    part = field.parts[field.data[0]]
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part.tolist()[0]


def _gguf_loader(tensor, shape: tuple[int, ...], permuted_heads: int | None) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        kind = tensor.tensor_type
        if kind == GGMLQuantizationType.F32:
            values = torch.from_numpy(tensor.data.copy())
        elif kind in (GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            values = torch.from_numpy(tensor.data.copy())
            values = values.view(torch.bfloat16) if kind == GGMLQuantizationType.BF16 else values
        else:
            values = torch.from_numpy(dequantize(tensor.data, kind))
        values = values.to(torch.float32).reshape(shape)
        return unpermute_rows(values, permuted_heads) if permuted_heads else values

    return load


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row order for q/k: it stores each head's rows as interleaved
    (first-half row i, second-half row i) pairs; we want all first-half rows, then the second."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, -1).transpose(1, 2).reshape(rows, -1).contiguous()


def _gguf_tokenizer(path: Path, meta: dict, out: Path) -> None:
    """transformers turns the GGUF's embedded vocabulary into a tokenizer.json."""
    try:
        from transformers import AutoTokenizer
    except ImportError as error:
        raise ImportError("the GGUF tokenizer is converted by transformers: pip install 'bam_lightning[hf]'") \
            from error
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out))
    for name in list(out.iterdir()):
        if name.name not in TOKENIZER_FILES:
            name.unlink()
    _set_eos(out, meta.get("tokenizer.ggml.eos_token_id"))


# ----- shared -----
def _check_all_present(plan: ImportPlan, src: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor our GPT needs is in the source with the shape the config implies; returns our
    keys (in the GPT's own order, read off a meta-device model) and their shapes."""
    shapes = our_keys(plan.config)
    for key, shape in shapes.items():
        theirs = plan.names.get(key, key)
        if key not in plan.tensors:
            raise KeyError(f"{src}: missing tensor {theirs!r} (our {key!r})")
        got = plan.tensors[key].shape
        if ((1, *got) if is_banked(key) else tuple(got)) != shape:
            raise UserError(f"{src}: tensor {theirs!r} has shape {list(got)}, the config implies "
                             f"{list(shape[1:] if is_banked(key) else shape)}")
    return shapes


def _planned(key: str, source: SourceTensor, shape: tuple[int, ...], dtype: torch.dtype | None) -> PlannedTensor:
    out_dtype = dtype or source.dtype

    def make() -> torch.Tensor:
        return source.load().to(out_dtype).reshape(shape)

    return PlannedTensor(key, shape, out_dtype, make)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bam import-hf", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
    parser.add_argument("--out", required=True, help="the seed checkpoint to write (.safetensors); the "
                        "tokenizer goes to <name>.tokenizer/ beside it")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: the source's; "
                        "GGUF: float32)")
    parser.add_argument("--max-seq-len", type=int, help="context length recorded in the config "
                        "(default: the source's)")
    args = parser.parse_args(argv)
    import_hf(args.src, args.out, dtype=DTYPES.get(args.dtype), max_seq_len=args.max_seq_len)

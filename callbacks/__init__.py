"""Lightning callbacks, installed as `bam_lightning.callbacks` (YAML: `class_path: bam_lightning.callbacks.X`)."""

from bam_lightning.callbacks.metrics_file import MetricsFile
from bam_lightning.callbacks.monitoring import NonFiniteLossGuard, TokenThroughput
from bam_lightning.callbacks.preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from bam_lightning.callbacks.progress import ProgressLog
from bam_lightning.callbacks.samples import GenerationSamples
from bam_lightning.callbacks.upcycling import UpcyclingCallback

__all__ = ["PREEMPTED_EXIT_CODE", "GenerationSamples", "MetricsFile", "NonFiniteLossGuard", "PreemptionCheckpoint",
           "ProgressLog", "TokenThroughput", "UpcyclingCallback"]

"""Downstream accuracy through lm-evaluation-harness: our model adapter (`adapter.BamLM`), the
offline task definitions (`tasks`), and `bam eval` (`command`). Needs the `eval` extra."""

"""Judging checkpoints and engines: parity with transformers (verify) and ROUGE (summarize)."""

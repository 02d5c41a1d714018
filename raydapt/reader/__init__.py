"""Frozen readers (Levine et al., 2022): retrieve, re-rank, pack, and prompt-tune the frozen LM reading."""

"""Extending a frozen LM to a new language: neutral residues against its baselines (raydapt.adapters)."""

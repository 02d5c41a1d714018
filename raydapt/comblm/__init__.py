"""CombLM: adapt a black-box LM by mixing its next-token distribution with a small fine-tuned expert's."""

"""GDFO: derivative-free search of BBT's prompt, harmonised with gradients through a distilled student."""

"""Black-box prompt tuning (BBT, BBTv2): projections, losses and metrics; no Ray, no model."""
from raydapt.bbt.losses import LOSSES, METRICS, accuracy, cross_entropy, hinge, macro_f1
from raydapt.bbt.space import DeepPromptSpace, PromptSpace, clipped_std, layer_seed

__all__ = ["PromptSpace", "DeepPromptSpace", "clipped_std", "layer_seed",
           "cross_entropy", "hinge", "accuracy", "macro_f1", "LOSSES", "METRICS"]

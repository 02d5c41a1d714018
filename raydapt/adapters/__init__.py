"""Extensions of a frozen LM (neutral residues, its ablations, a vanilla adapter, LoRA, full
fine-tuning): config, layers, attach, loss."""
from raydapt.adapters.attach import adapters_of, attach, load_trainable, trainable_state
from raydapt.adapters.config import METHODS, AdapterConfig
from raydapt.adapters.layers import GatedResidual
from raydapt.adapters.loss import extension_loss, l1_term

__all__ = ["AdapterConfig", "METHODS", "GatedResidual", "attach", "adapters_of", "trainable_state",
           "load_trainable", "extension_loss", "l1_term"]

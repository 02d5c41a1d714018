"""TARP (Hou, Salazar, Polovets, TACL 2022): every attention and FFN linear of a frozen LM
reparameterised as W = Phi1 (.) W0 + Phi2 with low-rank, optionally input-dependent Phi."""
from raydapt.adapters.tarp.attach import attach_tarp, tarp_layers, target_linears
from raydapt.adapters.tarp.config import KINDS, TARPConfig
from raydapt.adapters.tarp.layer import TARPDelta

__all__ = ["TARPConfig", "KINDS", "TARPDelta", "attach_tarp", "tarp_layers", "target_linears"]

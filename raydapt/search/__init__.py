"""Derivative-free search behind ask/tell (pycma, nevergrad); evaluation is the caller's business."""
from raydapt.search.optimizers import (CMAOptimizer, NevergradOptimizer, Optimizer, make_optimizer, pycma_seed,
                                       restore)

__all__ = ["Optimizer", "CMAOptimizer", "NevergradOptimizer", "make_optimizer", "restore", "pycma_seed"]

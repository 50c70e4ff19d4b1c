"""Fused LM-head log-probabilities: see kernels/logprobs.py."""
from kernels.logprobs import token_logprobs, which_backend

__all__ = ["token_logprobs", "which_backend"]

"""Fused LM-head log-probabilities: see kernels/logprobs.py."""
from kernels.logprobs import logprobs_from_logits, token_logprobs, which_backend

__all__ = ["token_logprobs", "logprobs_from_logits", "which_backend"]

"""draftdistill: on-policy distillation of speculative-decoding drafters and LLM students."""

__version__ = "0.1.0"

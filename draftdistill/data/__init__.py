"""Prompt sources, held-out splits and chat templating."""
from .chat import encode_prompt, stop_token_ids
from .prompts import Prompt, PromptFileError, load_prompts, read_prompt_file, split_of

__all__ = ["encode_prompt", "stop_token_ids", "Prompt", "PromptFileError", "load_prompts", "read_prompt_file",
           "split_of"]

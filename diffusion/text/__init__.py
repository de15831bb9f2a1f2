"""Text inputs for prompt-conditioned models: CLIP's byte-level BPE tokenizer.

Plain Python and numpy (no torch, no transformers at run time); the text encoder that
reads its ids is `diffusion.models.clip_text`.
"""
from diffusion.text.tokenizer import (CLIPTokenizer, TokenizedText, bytes_to_unicode,
                                      load_clip_tokenizer)

__all__ = ["CLIPTokenizer", "TokenizedText", "bytes_to_unicode", "load_clip_tokenizer"]

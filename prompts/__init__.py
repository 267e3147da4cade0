"""Prompt text -> tokens -> conditioning: Noodle's `prompts` package.

Token counts come from the real CLIP tokenizer (shipped in `clip_tokenizer/`); prompts are
split into 75-token chunks, weighted with A1111's emphasis syntax (or read exactly as ComfyUI reads
them: `syntax="comfy"`), and encoded with transformers CLIP text models the way ComfyUI's
CLIPTextEncode does. Around that: LoRA tags,
textual-inversion embeddings, wildcards and style templates.

This package imports neither `engine` nor `bot`: imports point downstream (bot -> engine -> prompts).
"""

from .cache import CacheInfo, PromptEncoderCache
from .chunks import CHUNK_TOKENS, Chunk
from .embeddings import EmbeddingLibrary, EmbeddingMatch
from .emphasis import Fragment, parse_weighted
from .encode import ClipEncoder, Weighting, encode_prompt, sd1_encoder, sdxl_encoders
from .encoded import EncodedPrompt
from .errors import PromptError
from .loras import LoraTag, extract_lora_tags
from .names import closest_names
from .plan import SYNTAXES, PromptPlan, Syntax, encoded_fragments, plan_prompt, token_report
from .report import TokenReport
from .styles import Style, apply_style, load_styles
from .tokenizer import clip_tokenizer, count_tokens
from .wildcards import available_wildcards, resolve_wildcards

__all__ = [
    "CHUNK_TOKENS",
    "SYNTAXES",
    "CacheInfo",
    "Chunk",
    "ClipEncoder",
    "EmbeddingLibrary",
    "EmbeddingMatch",
    "EncodedPrompt",
    "Fragment",
    "LoraTag",
    "PromptEncoderCache",
    "PromptError",
    "PromptPlan",
    "Style",
    "Syntax",
    "TokenReport",
    "Weighting",
    "apply_style",
    "available_wildcards",
    "clip_tokenizer",
    "closest_names",
    "count_tokens",
    "encode_prompt",
    "encoded_fragments",
    "extract_lora_tags",
    "load_styles",
    "parse_weighted",
    "plan_prompt",
    "resolve_wildcards",
    "sd1_encoder",
    "sdxl_encoders",
    "token_report",
]

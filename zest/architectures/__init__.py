"""Architectures: one registry of adapters, one entry per kind of architecture (ARCHITECTURE.md
§6, "An architecture").

:mod:`~zest.architectures.base` holds the entry (:class:`Architecture`), the registry, recognition,
heads and module types; the built-in entries are in :mod:`~zest.architectures.vision`,
:mod:`~zest.architectures.encoders` and :mod:`~zest.architectures.decoders` (their stage plans:
:mod:`zest.stages`); :data:`GENERIC` is registered last.
"""

from zest.architectures import decoders, encoders, vision
from zest.architectures.base import (
    ARCHITECTURES,
    GENERIC,
    HF_HEAD_NAMES,
    LAYER_KINDS,
    Architecture,
    ArchitectureFallbackWarning,
    ModuleType,
    architecture_for,
    architecture_named,
    conv_forward,
    gps_keeps_frozen,
    layer_kind,
    library_head,
    module_type,
    module_types,
    note_fallback,
    register_architecture,
    timm_head,
    transformers_head,
)

for _entry in (*vision.ENTRIES, *encoders.ENTRIES, *decoders.ENTRIES, GENERIC):
    register_architecture(_entry)  # in recognition order; GENERIC last

#: The architectures that ship with zest (they cannot be unregistered).
BUILT_IN_ARCHITECTURES = tuple(ARCHITECTURES.names())


def unregister_architecture(name: str) -> None:
    """Removes a registered architecture (a plugin's, or a test's); the built-in ones stay."""
    if name in BUILT_IN_ARCHITECTURES:
        raise ValueError(f"{name!r} is a built-in architecture and cannot be removed")
    ARCHITECTURES.unregister(name)
    module_types.cache_clear()


__all__ = ["ARCHITECTURES", "BUILT_IN_ARCHITECTURES", "GENERIC", "HF_HEAD_NAMES", "LAYER_KINDS",
           "Architecture", "ArchitectureFallbackWarning", "ModuleType", "architecture_for",
           "architecture_named", "conv_forward", "gps_keeps_frozen", "layer_kind",
           "library_head", "module_type", "module_types", "note_fallback",
           "register_architecture", "timm_head", "transformers_head",
           "unregister_architecture"]

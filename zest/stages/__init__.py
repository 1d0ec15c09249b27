"""Stage plans: a model's forward cut at block boundaries, for the frozen-prefix cache
(ARCHITECTURE.md §5).

The ground-truth collector fine-tunes one layer at a time with everything before the layer's
block frozen, so the output of that frozen prefix can be computed once per example and reused.
:mod:`~zest.stages.plan` holds the plan itself, :mod:`~zest.stages.verify` checks an
architecture's plan against the model's own forward, :mod:`~zest.stages.states` slices, trims
and re-pads cached states, :mod:`~zest.stages.prefix_cache` holds the cached outputs of a
frozen prefix; the plans of the built-in architectures are in
:mod:`~zest.stages.vision`, :mod:`~zest.stages.encoders` and :mod:`~zest.stages.decoders`.
"""

from zest.stages.decoders import DecoderLayout
from zest.stages.plan import PlanBuilder, StageFunction, StagePlan, State
from zest.stages.prefix_cache import PrefixCache
from zest.stages.states import TOKEN_KEYS, pad_tokens, slice_state, trim_padding
from zest.stages.verify import stage_plan

__all__ = ["DecoderLayout", "PlanBuilder", "PrefixCache", "StageFunction", "StagePlan", "State",
           "TOKEN_KEYS", "pad_tokens", "slice_state", "stage_plan", "trim_padding"]

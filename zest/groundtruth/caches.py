"""The process-level caches of the ground truth: each loaded (model, data) pair, and per pair and
split the deepest frozen-prefix outputs computed so far (ARCHITECTURE.md §5).

A worker process runs many jobs of the same group; it loads the pair once and every job
restores the model before it returns, so the next job finds it as loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from zest.data import Dataset
from zest.loading import DataOptions, load_pair
from zest.models import Task
from zest.stages import PrefixCache


@dataclass(frozen=True)
class PairSpec:
    """What a worker needs to rebuild the (model, data) pair of a group."""

    model: str
    dataset: str
    options: DataOptions = field(default_factory=DataOptions)
    data_seed: int = 0
    device: str = "cpu"
    checkpoint: str | None = None

    def key(self) -> tuple:
        return (self.model, self.dataset, repr(self.options), self.data_seed, self.device,
                self.checkpoint)


#: The pairs this process loaded, by :meth:`PairSpec.key` (at most :data:`MAX_PAIRS`).
PAIRS: dict[tuple, tuple[nn.Module, Task, Dataset]] = {}
MAX_PAIRS = 2

#: Per loaded pair and split (``(pair key, eval batch size, split)``), the last frozen-prefix
#: outputs computed in this process. The prefix is frozen and the model is restored after every
#: job, so a later job whose layers sit deeper, over the same examples, continues from there
#: instead of re-running the prefix from the input: across the blocks of one seed the prefix
#: costs one forward pass of the data in all, not one per block. The val entry serves every
#: seed; the train entry holds the examples of one seed's batch order.
PREFIXES: dict[tuple, PrefixCache] = {}


def cached_pair(pair: PairSpec) -> tuple[nn.Module, Task, Dataset]:
    """The loaded (model, task, data) of ``pair``, kept per process so a worker loads each
    group once; loading a third pair drops the oldest with its prefixes."""
    key = pair.key()
    if key not in PAIRS:
        if len(PAIRS) >= MAX_PAIRS:
            evicted = next(iter(PAIRS))
            PAIRS.pop(evicted)
            for prefix_key in [k for k in PREFIXES if k[0] == evicted]:
                PREFIXES.pop(prefix_key)
        PAIRS[key] = load_pair(pair.model, pair.dataset, options=pair.options,
                               seed=pair.data_seed, device=pair.device,
                               checkpoint=pair.checkpoint)
    return PAIRS[key]

"""Data sets: packaged corpora and user data, split deterministically into train/val/test.

A data set is named by a *spec* string:

* packaged sets registered in :data:`DATASETS` (:mod:`zest.data.packaged`): ``digits``,
  ``mnist5k``, ``lfw_faces``, ``patches`` (images), ``20ng``, ``20ng_coarse``, ``r8``, ``r52``,
  ``rotten_tomatoes`` (text);
* user data, read by the prefix's reader in :data:`FILE_READERS` (:mod:`zest.data.files`):
  ``csv:<path>`` and ``parquet:<path>`` (a text column and a label column), ``imagefolder:<dir>``
  (one subfolder per class) and ``npz:<path>`` (arrays ``x`` and ``y``);
* ``lm:<text data set>``: the same texts for the causal-LM task (next-token prediction;
  :func:`task_of_spec`).

A source returns :class:`RawData` (:mod:`zest.data.raw`); :func:`load_dataset`
(:mod:`zest.data.splits`) maps the sorted unique label names to ids ``0..C-1``, makes seeded,
stratified train/val/test splits (a source's official test split is kept as the test split and
the validation split is carved from its training part), applies the optional per-split caps,
resizes images to ``image_size`` and tokenises text once when a tokenizer is given. The returned
:class:`Dataset` (:mod:`zest.data.dataset`) hands out batches in the format the model tasks
expect: ``(x, y)`` for images (``x`` float32 N×C×H×W in [0, 1], not normalised) and
``{"input_ids", "attention_mask", "labels"}`` for text. Adding a source: ARCHITECTURE.md §6.
"""

from zest.data.dataset import SPLITS, Dataset, Split
from zest.data.files import FILE_READERS, ReadOptions, register_file_reader, user_specs
from zest.data.packaged import DATASETS
from zest.data.raw import RawData, frozen_array
from zest.data.splits import LM_PREFIX, known_datasets, load_dataset, task_of_spec

__all__ = ["DATASETS", "FILE_READERS", "LM_PREFIX", "SPLITS", "Dataset", "RawData", "ReadOptions",
           "Split", "frozen_array", "known_datasets", "load_dataset", "register_file_reader",
           "task_of_spec", "user_specs"]

"""Loading a (model, data set) pair the way every command does: the data options, then a model
with a head of the data set's class count (text tokenised with the model's tokenizer), or, for
an ``lm:<text data set>`` spec, a causal decoder with its pretrained LM head. Used by the online
path (``zest rank``, ``zest finetune``) and the offline one (collectors) alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from zest.data import Dataset, load_dataset, task_of_spec
from zest.data.splits import check_data_args
from zest.errors import InvalidInputError
from zest.models import Task, check_model_spec, check_task_kind, load_model


def _option(default: Any, help: str, cli: bool = True) -> Any:  # noqa: A002 - Typer's word
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass(frozen=True)
class DataOptions:
    """How to load a data set: declared once here; the CLI's options (``--image-size``, ...) and
    the grid files' keys are generated from these fields (ARCHITECTURE.md §3a). Checked once,
    when built (frozen, so they stay as checked)."""

    image_size: int | None = _option(None, "Image side in pixels (default 64).")
    max_length: int = _option(128, "Maximum tokens per text.")
    max_train: int | None = _option(None, "Cap on train examples.")
    max_val: int | None = _option(None, "Cap on validation examples.")
    max_test: int | None = _option(None, "Cap on test examples.", cli=False)
    text_column: str = _option("text", "Text column of csv:/parquet: data.")
    label_column: str = _option("label", "Label column of csv:/parquet: data.")
    val_fraction: float | None = _option(None, "Share of the examples for validation.",
                                         cli=False)
    test_fraction: float | None = _option(None, "Share of the examples for testing.", cli=False)

    def __post_init__(self) -> None:
        check_data_args(image_size=self.image_size, max_length=self.max_length,
                        caps={"train": self.max_train, "val": self.max_val,
                              "test": self.max_test},
                        val_fraction=self.val_fraction, test_fraction=self.test_fraction)

    def settings(self) -> dict[str, Any]:
        """The options as flat, JSON-friendly settings, as stamped into record files (the split
        fractions only when set)."""
        return {k: v for k, v in vars(self).items()
                if v is not None or k not in ("val_fraction", "test_fraction")}

    def dataset_arguments(self) -> dict[str, Any]:
        """The options as :func:`zest.data.load_dataset` keywords: the image side 64 when unset,
        the split fractions only when set (the loader's defaults apply to the others)."""
        return {**self.settings(), "image_size": self.image_size or 64}


def load_pair(model_spec: str, dataset_spec: str, *, options: DataOptions | None = None,
              seed: int = 0, device: str = "cpu", checkpoint: str | None = None
              ) -> tuple[nn.Module, Task, Dataset]:
    """Loads a data set and a model with a head of the data set's class count; text data is
    tokenised with the model's tokenizer. An ``lm:<text data set>`` spec loads the model for the
    causal-LM task (only causal decoders take it; others are refused before loading).
    ``options`` (default: ``DataOptions()``) were checked when built and go to the loader as
    they are (:meth:`DataOptions.dataset_arguments`)."""
    options = options or DataOptions()
    check_model_spec(model_spec)
    check_task_kind(model_spec, task_of_spec(dataset_spec)[0])
    arguments = options.dataset_arguments()
    data = load_dataset(dataset_spec, seed=seed, **arguments)
    n_train = len(data.splits["train"])
    if n_train < 2:
        cap = f" (max_train={options.max_train})" if options.max_train else ""
        raise InvalidInputError(f"the train split of {dataset_spec!r} has {n_train} example"
                                f"{'' if n_train == 1 else 's'}{cap}; at least 2 are needed: "
                                "raise max_train or add data", parameter="max_train")
    model, task = load_model(model_spec, data.num_classes, seed=seed, device=device,
                             checkpoint=checkpoint, image_size=arguments["image_size"],
                             kind=data.task_kind)
    if task.modality != data.modality:
        raise InvalidInputError(f"model {model_spec!r} takes {task.modality} inputs but data set "
                                f"{dataset_spec!r} is {data.modality}; pair image models with "
                                "image data and text models with text data")
    if data.modality == "text":
        data = load_dataset(dataset_spec, seed=seed, tokenizer=task.tokenizer, **arguments)
    return model, task, data

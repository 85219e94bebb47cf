"""The options of one training run, as one typed object.

A :class:`TrainConfig` is made from the effective settings when a run starts, recorded in
``run.json`` under ``"training"`` (:meth:`TrainConfig.to_dict`) and read back from there
(:meth:`TrainConfig.from_dict`) by ``--resume`` and by everything that reads a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from melanoma.modeling.models import default_weights, is_pretrainable

ClassBalance = Literal["weights", "sampling", "class-source", "none"]
# Options that runs recorded before they existed lack; the value is what those runs did.
ADDED_LATER: dict[str, Any] = {"extra_augment": False, "vignette_augment": False}


@dataclass(frozen=True)
class TrainConfig:
    """Every option that decides what a training run does (its defaults live in
    :class:`melanoma.config.Settings`; the field names are the settings' names)."""

    model: str
    weights: str  # "imagenet", "none" or a weights file
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    class_balance: ClassBalance
    augment: bool
    extra_augment: bool
    vignette_augment: bool
    early_stopping_patience: int
    time_limit_minutes: float | None
    freeze_epochs: int  # pretrained backbones only: epochs that train the new head alone
    tensorboard: bool

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> TrainConfig:
        """The fields of the same names from :class:`melanoma.config.Settings`, then
        ``overrides``; made consistent as a new run records them: no weights means the
        model's :func:`~melanoma.modeling.models.default_weights`, the extra and vignette
        augmentations need ``augment``, and ``freeze_epochs`` is 0 where no pretrained
        backbone is fine-tuned."""
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"TrainConfig has no option {', '.join(sorted(unknown))}")
        values = {name: getattr(settings, name) for name in names} | overrides
        weights = values["weights"]
        values["weights"] = str(default_weights(values["model"]) if weights is None else weights)
        config = cls(**values)
        return replace(config, extra_augment=config.extra_augment and config.augment,
                       vignette_augment=config.vignette_augment and config.augment,
                       freeze_epochs=config.freeze_epochs if config.fine_tunes_backbone else 0)

    @property
    def fine_tunes_backbone(self) -> bool:
        """True for a pretrained backbone started from weights (trained in phases)."""
        return is_pretrainable(self.model) and self.weights != "none"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the keys ``run.json`` has always had under ``"training"``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`, also for runs recorded before an option existed
        (:data:`ADDED_LATER`). KeyError names a missing option; unknown keys are ignored."""
        names = [f.name for f in fields(cls)]
        values = {**ADDED_LATER, **{key: value for key, value in data.items() if key in names}}
        missing = [name for name in names if name not in values]
        if missing:
            raise KeyError(f"training.{missing[0]}")
        return cls(**values)


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TrainConfig))


def ignored_options(recorded: TrainConfig, passed: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(option, value passed, value recorded)`` for each option in ``passed`` (option name ->
    value) whose value differs from ``recorded``: what a resumed run will not use."""
    kept = recorded.to_dict()
    given = {name: str(value) if name == "weights" else value for name, value in passed.items()}
    return [(name, value, kept[name]) for name, value in given.items() if value != kept[name]]

"""The run's input preprocessing, resolved once from the backbone and the config, recorded in
every checkpoint and read back from it.

    resolve_preprocessing(cfg)          backbone's weights convention + config overrides
    preprocessing_record(cfg)           the plain record a checkpoint's meta keeps
    preprocessing_of_checkpoint(state)  what a checkpoint was trained with
    checkpoint_overrides(state)         the same as ``augment.*`` overrides of its config

The convention comes from the backbone's weights (`tsn.backbones.weights_preprocessing`, like
timm's ``pretrained_cfg``); ``augment.mean`` / ``augment.std`` / ``augment.channel_order``
replace parts of it when set. The data path gets it through `app.pipeline.pipeline_spec`
(mean / std / channel order of the `PipelineSpec`). Evaluation and prediction apply the
recorded one (`checkpoint_overrides`), so a checkpoint is fed as it was trained even if the
backbone's defaults change later.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.config import Config
from dataloading.planning.preprocessing import Preprocessing

META_KEY = "preprocessing"  # the checkpoint meta entry


def resolve_preprocessing(cfg: Config) -> Preprocessing:
    """``model.backbone``'s weights convention with the ``augment`` overrides applied."""
    from tsn.backbones import weights_preprocessing

    a = cfg.augment
    base = Preprocessing(**weights_preprocessing(cfg.model.backbone))
    return base.with_overrides(mean=a.mean, std=a.std, channel_order=a.channel_order)


def preprocessing_record(cfg: Config) -> dict:
    """The resolved preprocessing as plain data for ``cfg.model.modality`` (checkpoint meta)."""
    return resolve_preprocessing(cfg).record(cfg.model.modality)


def preprocessing_of_checkpoint(state: Mapping, source: str = "checkpoint") -> Preprocessing:
    """What a checkpoint's network was fed: its ``meta['preprocessing']`` record; a checkpoint
    from before the record existed was fed RGB with its config's ``augment.mean`` / ``std``
    (ImageNet statistics if absent), whatever its backbone."""
    meta = state.get("meta") or {}
    if META_KEY in meta:
        return Preprocessing.from_record(meta[META_KEY], f"{source}: meta.{META_KEY}")
    augment = dict((state.get("config") or {}).get("augment") or {})
    legacy = Preprocessing(source=f"{source}: no preprocessing record (older checkpoint): RGB, its config's mean/std")
    return legacy.with_overrides(mean=augment.get("mean"), std=augment.get("std"),
                                 channel_order=augment.get("channel_order") or "RGB")


def checkpoint_overrides(state: Mapping, source: str = "checkpoint") -> list[str]:
    """``augment.mean`` / ``augment.std`` / ``augment.channel_order`` overrides (``a.b=value``)
    that make a checkpoint's config resolve to the preprocessing it was trained with. Put user
    overrides after them to change it deliberately."""
    p = preprocessing_of_checkpoint(state, source)
    return [f"augment.mean={list(p.mean_01)}", f"augment.std={list(p.std_01)}",
            f"augment.channel_order={p.channel_order}"]

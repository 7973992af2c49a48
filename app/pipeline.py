"""The config -> `PipelineSpec` adapter: the one place that reads the config's data sections
(model shape, augmentation, loader) to say what the data pipeline produces."""

from __future__ import annotations

from dataloading.planning.augment import CropSpec
from dataloading.planning.spec import PipelineSpec


def pipeline_spec(cfg, mode: str, batch_size: int | None = None) -> PipelineSpec:
    """The spec of ``mode`` ('train', 'val' or 'test': test uses ``model.test_segments``)
    for the typed config ``cfg``; ``batch_size`` defaults to ``train.batch_size_per_worker``."""
    from app.preprocessing import resolve_preprocessing

    a, m = cfg.augment, cfg.model
    pre = resolve_preprocessing(cfg)  # the backbone's input convention, config overrides applied
    crop = CropSpec(input_size=a.input_size, scales=a.scales, max_distort=a.max_distort,
                    more_fix_crop=a.more_fix_crop, resize_short=a.resize_short, flip=a.flip)
    return PipelineSpec(
        mode=mode, num_segments=m.test_segments if mode == "test" else m.num_segments,
        snippet_length=m.snippet_length, modality=m.modality,
        batch_size=batch_size or cfg.train.batch_size_per_worker, crop=crop,
        mean=pre.mean_01, std=pre.std_01, channel_order=pre.channel_order, device=cfg.loader.device,
        num_threads=cfg.loader.num_threads,
        seed=cfg.run.seed, order_shard_block=cfg.data.order_shard_block,
        prefetch_queue_depth=cfg.loader.prefetch_queue_depth, flow_source=cfg.loader.flow_source)

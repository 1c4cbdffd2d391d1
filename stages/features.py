"""Stage: the feature caches of frozen-trunk training (`train.frozen_trunk`, dmgcli/features.py).

For every backbone of the matrix, the frozen trunk's output for every image and view of the
dataset, in <data_dir>/features/<dataset>/<backbone>.h5; an index.json beside them says what
was cached under which key. With frozen_trunk false nothing is computed and the index says so
(the folder is a DVC output either way, so the pipeline has one shape).
A cache whose key still matches is kept; one built for other settings is rebuilt.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from dmgcli.datasets import DatasetInfo, require_h5
from dmgcli.fileio import write_json
from dmgcli.params import Schedule, TrainParams

if TYPE_CHECKING:
    from dmgcli.methods import MethodConfig

# torch (and the modules that need it) is imported only when there is a trunk to run: without
# train.frozen_trunk this stage writes its index in a fraction of a second, not after torch's import.


def trunk_config(params: TrainParams, backbone: str, num_classes: int, schedule: Schedule) -> MethodConfig:
    """The part of a run's MethodConfig its frozen trunk depends on (make_spec gives runs the same)."""
    from dmgcli.methods import MethodConfig

    return MethodConfig(backbone=backbone, num_classes=num_classes, num_domains=1, pretrained=params.pretrained,
                        pretrained_path=params.pretrained_path, mask_points=params.mask_points,
                        **schedule.optimizer_settings(),
                        frozen_trunk=True, image_size=params.image_size, trunk_views=params.trunk_views)


def features(info: DatasetInfo, data_dir: str | Path, params: TrainParams, backbones: tuple[str, ...],
             quiet: bool = False) -> Path:
    """Build (or keep) the caches of `backbones`; returns the index file's path."""
    folder = Path(data_dir) / "features" / info.name
    index = {"dataset": info.name, "frozen_trunk": params.frozen_trunk, "caches": {}}
    if params.frozen_trunk:
        from dmgcli import features as feats
        from dmgcli.engine import resolve_device
        from dmgcli.h5data import read_info

        h5 = require_h5(data_dir, info.name)
        classes = len(read_info(h5).classes)
        device = resolve_device(params.device)
        for backbone in backbones:
            config = trunk_config(params, backbone, classes, params.schedule_for(info.schedule_key))
            key = feats.trunk_key(config, info.augmentation, h5, params.image_size, params.trunk_views)
            path = feats.ensure_cache(feats.cache_path(data_dir, info.name, backbone), key, h5, config, device, quiet)
            index["caches"][backbone] = {"file": path.name, "key": dataclasses.asdict(key)}
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "index.json", index)
    return folder / "index.json"

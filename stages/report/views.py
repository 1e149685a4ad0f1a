"""An image and its perturbed views as the model saw them (at its input size, before
normalisation), for the report's CAM overlays: the same preprocessing and the same seeded
perturbations as the extract stage (stages/models.Preprocess, stages/perturb)."""
from __future__ import annotations

import numpy as np


def view_images(data, ids, views: list[str]) -> dict[tuple[int, str], np.ndarray]:
    """(image_id, view) -> RGB uint8 (S, S, 3); images whose bytes do not decode are left out."""
    import torch

    from featscope.stages import perturb
    from featscope.stages.images import decode_rgb
    from featscope.stages.models import Preprocess

    pre = data.meta.get("preprocess") or {}
    cfg = data.meta.get("config") or {}
    if not pre.get("image_size"):
        return {}
    prep = Preprocess(pre["image_size"], pre.get("resize") or pre["image_size"], pre.get("mean") or [0, 0, 0],
                      pre.get("std") or [1, 1, 1])
    seed = int(cfg.get("seed", 0) or 0)
    out = {}
    for i, row in data.image_rows(ids).items():
        try:
            x = prep.geometry([decode_rgb(row["bytes"])])
        except Exception:  # noqa: BLE001 - a picture the report cannot draw is left out, not fatal
            continue
        out[(i, "orig")] = x[0].permute(1, 2, 0).numpy().astype(np.uint8)
        for view in views:
            if perturb.needs_source(view):
                img = perturb.background_image(cfg.get("data", ""), row["uri"], view, seed, i)
                t = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
                v = prep.geometry([t]).float()
            else:
                v = perturb.apply(x.float(), [i], view, seed)
            out[(i, view)] = v[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out

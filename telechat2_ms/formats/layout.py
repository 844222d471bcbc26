"""The per-rank checkpoint layout directory, written by `python -m convert reshard` and by multi-process
training, read by the converters and by the parallel build:

    layout.json                    format, tp, pp, layer_counts, layer_ranges, rank order, fused flag,
                                   model_config (the HF config.json dict), optional training info
    tp{t}_pp{p}/model.safetensors  the parameters of pipeline stage p, tensor-parallel slice t
    tp{t}_pp{p}/exp_avg.safetensors, exp_avg_sq.safetensors
                                   training checkpoints: AdamW's moments of the same slices, under the
                                   parameters' names (so they reshard and merge by the same rules)

Parameter names keep their global layer index on every stage; rank = p * tp + t. Each rank file also records
its own (tp, tp_rank, pp, pp_stage, layer_range) in its safetensors metadata under `telechat2_shard`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from telechat2_ms.formats.errors import CheckpointError

LAYOUT_NAME = "layout.json"
LAYOUT_FORMAT = "telechat2_ms.sharded/1"
SHARD_FILE = "model.safetensors"
SHARD_METADATA_KEY = "telechat2_shard"


def rank_file(tp_rank: int, stage: int, file: str = SHARD_FILE) -> str:
    """Path of one rank's file inside a layout directory (`file`: the weights, or another per-rank file)."""
    return os.path.join(f"tp{tp_rank}_pp{stage}", file)


def is_layout_dir(path: str) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, LAYOUT_NAME))


def shard_metadata(tp: int, tp_rank: int, pp: int, stage: int, layer_range: Sequence[int]) -> Dict[str, str]:
    return {SHARD_METADATA_KEY: json.dumps({"tp": tp, "tp_rank": tp_rank, "pp": pp, "pp_stage": stage,
                                            "layer_range": list(layer_range)})}


def layout_dict(tp: int, ranges: Sequence[Tuple[int, int]], model_config: Dict[str, Any], fused_qkv: bool,
                training: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    pp = len(ranges)
    layout = {"format": LAYOUT_FORMAT, "tp": tp, "pp": pp, "layer_counts": [end - first for first, end in ranges],
              "layer_ranges": [list(r) for r in ranges], "layer_numbering": "global",
              "rank_order": "rank = pp_stage * tp + tp_rank", "fused_qkv": bool(fused_qkv),
              "files": {str(s * tp + t): rank_file(t, s) for s in range(pp) for t in range(tp)},
              "model_config": model_config}
    if training is not None:
        layout["training"] = training
    return layout


def write_layout(directory: str, layout: Dict[str, Any]) -> None:
    with open(os.path.join(directory, LAYOUT_NAME), "w", encoding="utf-8") as f:
        json.dump(layout, f, indent=2)
        f.write("\n")


def read_layout(directory: str) -> Dict[str, Any]:
    """layout.json of `directory`, checked for format and the fields every reader needs."""
    path = os.path.join(directory, LAYOUT_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory} is not a sharded checkpoint (no {LAYOUT_NAME})")
    try:
        with open(path, encoding="utf-8") as f:
            layout = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        found = layout.get("format") if isinstance(layout, dict) else type(layout).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {LAYOUT_FORMAT!r}")
    try:
        layout["tp"], layout["pp"] = int(layout["tp"]), int(layout["pp"])
        layout["layer_counts"] = [int(c) for c in layout["layer_counts"]]
        layout["layer_ranges"] = [[int(a), int(b)] for a, b in layout["layer_ranges"]]
        if not isinstance(layout["model_config"], dict):
            raise TypeError("model_config is not a mapping")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid layout: {type(e).__name__}: {e}") from None
    return layout


def open_rank_file(directory: str, layout: Dict[str, Any], tp_rank: int, stage: int, file: str = SHARD_FILE):
    """The SafetensorsFile of rank (tp_rank, stage) of a layout directory, after checking that the
    position it records in its metadata (`telechat2_shard`: tp, tp_rank, pp, pp_stage, layer_range) is that
    one: a file copied or renamed into another rank's place is refused, naming both, instead of being read
    as the wrong slice. CheckpointError for a missing, unreadable or misplaced file."""
    from telechat2_ms.formats.safetensors_io import SafetensorsFile

    name = rank_file(tp_rank, stage, file)
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: rank file {name} is missing")
    file = SafetensorsFile(path)
    expected = {"tp": layout["tp"], "tp_rank": tp_rank, "pp": layout["pp"], "pp_stage": stage,
                "layer_range": list(layout["layer_ranges"][stage])}
    raw = file.metadata.get(SHARD_METADATA_KEY)
    try:
        recorded = json.loads(raw) if raw is not None else None
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path} does not record its rank ({SHARD_METADATA_KEY} metadata missing or "
                              f"unreadable); write the layout again with `python -m convert reshard`")
    if {k: recorded.get(k) for k in expected} != expected:
        def where(d):
            return (f"tp_rank {d.get('tp_rank')} of tp {d.get('tp')}, pipeline stage {d.get('pp_stage')} of "
                    f"{d.get('pp')}, layers {d.get('layer_range')}")
        raise CheckpointError(f"{path} holds {where(recorded)}, but sits where {LAYOUT_NAME} puts {where(expected)}; "
                              "put the rank directories back in their places (or reshard again)")
    return file


def layout_ranges(layout: Dict[str, Any]) -> List[List[int]]:
    return [list(r) for r in layout["layer_ranges"]]

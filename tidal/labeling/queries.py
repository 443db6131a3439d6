"""The query files annotators answer: one cycle's query in three formats, the images of an
array pool, and the Label Studio labeling config.

Plain Python (stdlib csv/json, Pillow for the images), no orchestration imports: the cycle's
`export_query` step calls these with plain values (ids, dicts).

- `export_query_files` writes `query.csv`, `query.jsonl`, `query_labelstudio.json` (+ its
  `labelstudio_config.xml`) for one query; annotators fill the `label` field (a class NAME).
- `write_query_images` writes a PNG per queried sample of a pool that has no image files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from tidal.workspace import atomic_write_bytes, atomic_write_text, csv_rows

QUERY_COLUMNS = ["experiment", "cycle", "query_id", "id", "path", "score", "rank", "suggested_label", "label"]
EXPORT_FILES = {"csv": "query.csv", "jsonl": "query.jsonl", "label-studio": "query_labelstudio.json"}
LABELSTUDIO_CONFIG = "labelstudio_config.xml"


def _class_name(classes: list[str], idx: Any) -> str:
    if idx is None or idx == "":
        return ""
    i = int(idx)
    if not 0 <= i < len(classes):
        raise ValueError(f"suggested_label {i} is not a class index (0..{len(classes) - 1})")
    return classes[i]


def export_query_files(out_dir: Path, experiment: str, cycle: int, query_id: str, rows: list[dict],
                       classes: list[str]) -> dict[str, str]:
    """Write the query for annotators in three formats; returns {"csv", "jsonl", "label-studio"} paths.

    rows: dicts with id, path ("" without a file), score, rank (1-based), suggested_label (class index)
    and optionally confidence (the model's probability of its suggested label).
    """
    out_dir = Path(out_dir)
    records = []
    for r in rows:
        records.append({
            "experiment": experiment, "cycle": int(cycle), "query_id": query_id, "id": str(r["id"]),
            "path": r.get("path") or "", "score": float(r["score"]), "rank": int(r["rank"]),
            "suggested_label": _class_name(classes, r.get("suggested_label")), "label": None,
        })

    paths = {fmt: out_dir / name for fmt, name in EXPORT_FILES.items()}
    atomic_write_text(paths["csv"], ",".join(QUERY_COLUMNS) + "\n" + csv_rows(
        QUERY_COLUMNS, [{**rec, "score": repr(rec["score"]), "label": ""} for rec in records]))

    atomic_write_text(paths["jsonl"], "".join(json.dumps(rec) + "\n" for rec in records))

    model_version = f"{experiment}-cycle{cycle}"
    tasks = []
    for rec, row in zip(records, rows):
        # Label Studio reads a prediction's score as the model's confidence in [0, 1]; the
        # acquisition score (entropy, TiDAL's, ...) is in the task data, to sort by.
        prediction: dict[str, Any] = {"model_version": model_version, "result": []}
        if row.get("confidence") is not None:
            prediction["score"] = float(row["confidence"])
        if rec["suggested_label"]:
            prediction["result"] = [{"from_name": "label", "to_name": "image", "type": "choices",
                                     "value": {"choices": [rec["suggested_label"]]}}]
        tasks.append({
            "data": {"image": rec["path"], "sample_id": rec["id"], "experiment": experiment,
                     "cycle": rec["cycle"], "query_id": query_id, "rank": rec["rank"], "score": rec["score"]},
            "predictions": [prediction],
        })
    atomic_write_text(paths["label-studio"], json.dumps(tasks, indent=2) + "\n")
    atomic_write_text(out_dir / LABELSTUDIO_CONFIG, labelstudio_config(classes))
    return {fmt: str(p) for fmt, p in paths.items()}


QUERY_IMAGES_DIR = "images"  # in the cycle's folder: one PNG per queried sample of an array pool


def write_query_images(out_dir: Path, images_u8: Any) -> list[str]:
    """Each queried sample of a pool that has no image files (digits, npy, torchvision sets) as
    `images/<rank>.png` under the cycle's folder, so annotators and Label Studio can see it.

    `images_u8`: the queried samples in rank order, uint8 N×C×H×W (C = 1 or 3), written pixel for
    pixel; the bytes depend only on the pixels (no time or metadata in the file), so a rerun
    writes the same files. Returns the absolute paths, in rank order.
    """
    import io

    from PIL import Image

    folder = Path(out_dir) / QUERY_IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, image in enumerate(images_u8, start=1):
        pixels = image.permute(1, 2, 0).numpy()
        picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=9)
        path = folder / f"{rank:05d}.png"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(str(path.resolve()))
    return paths


def labelstudio_config(classes: list[str]) -> str:
    """Label Studio labeling config: one image, one single-choice question over the classes."""
    choices = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in classes)
    return ("<View>\n  <Image name=\"image\" value=\"$image\"/>\n"
            "  <Choices name=\"label\" toName=\"image\" choice=\"single\" showInLine=\"true\">\n"
            f"{choices}\n  </Choices>\n</View>\n")

"""Caption a shard set with a trained checkpoint: the one way to write a teacher's captions.

Every input tar shard becomes an output shard of the same name in the same img2dataset layout
(`KEY.jpg`, `KEY.txt`, `KEY.json`). `KEY.json` keeps the sample's original `captions` and adds
the model's under `teacher_captions` (and, for a refinement model, every step under
`teacher_steps`), with `teacher` naming the checkpoint and decoding. Uses: sequence-level
distillation (train on the teacher's captions, `config.data.teacher_caption_rate`), and
caption filtering, which scores these captions next to the originals.

A shard is written to `NAME.tar.tmp` and renamed when complete, with a `NAME.tar.captioned.json`
sidecar of its counts, so a re-run skips finished shards (resumable); `part`/`num_parts` split
the shards between independent processes (parallel). Bad samples are skipped and counted by
reason; `references.json` (the original captions) and `caption_summary.json` (the totals) are
written when every shard is done.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from refine_jax.data.pipeline import preprocess_image
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, SkipCounter, decode_image, is_record
from refine_jax.data.shard_writer import add_member
from refine_jax.data.shards import TarShardSource, expand_paths
from refine_jax.evaluation.caption_images import describe_images
from refine_jax.model_loading import LoadedModel

SIDECAR_SUFFIX = ".captioned.json"
SUMMARY_NAME = "caption_summary.json"
REFERENCES_NAME = "references.json"
_IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How the teacher writes: greedy or beam search (`beam` > 1) for the baseline; the
    refinement model always writes its K steps (its final step is the caption)."""

    method: str = "beam"
    beam: int = 3

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "beam": self.beam if self.method == "beam" else 1}


def _image_extension(image_bytes: bytes) -> str:
    with Image.open(io.BytesIO(image_bytes)) as image:
        return _IMAGE_EXTENSIONS.get(image.format or "", "jpg")


def caption_shard(
    loaded: LoadedModel,
    shard: str,
    output_dir: str,
    decoding: Decoding,
    teacher: dict[str, Any],
) -> dict[str, Any]:
    """Captions one input shard into `output_dir`; returns its sidecar (counts, references)."""
    name = os.path.basename(shard)
    counter = SkipCounter()
    source = TarShardSource(shard, verify_images=True)
    records = []
    counter.merge(source.structural_counts())
    for i in range(len(source)):
        element = source[i]
        if counter.observe(element) and is_record(element):
            records.append(element)
    source.close()
    size = loaded.config.model.image_size
    images = [preprocess_image(decode_image(r["image_bytes"]), size) for r in records]
    texts = (
        describe_images(loaded, np.stack(images), method=decoding.method, beam=decoding.beam)
        if images
        else []
    )

    written, empty, references = 0, 0, {}
    tmp = os.path.join(output_dir, name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for record, steps in zip(records, texts, strict=True):
            caption = steps[-1].strip()
            if not caption:  # the teacher wrote nothing: keep the sample, without a caption
                empty += 1
            key = record["key"]
            meta = {
                "key": key,
                "captions": list(record["captions"]),
                TEACHER_CAPTIONS_FIELD: [caption] if caption else [],
                "teacher": teacher,
            }
            if len(steps) > 1:
                meta["teacher_steps"] = list(steps)
            image_bytes = record["image_bytes"]
            add_member(tar, f"{key}.{_image_extension(image_bytes)}", image_bytes)
            add_member(tar, f"{key}.txt", record["captions"][0].encode("utf-8"))
            add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
            references[key] = list(record["captions"])
            written += 1
    os.replace(tmp, os.path.join(output_dir, name))
    sidecar = {
        "input": shard,
        "written": written,
        "teacher_wrote_nothing": empty,
        "skipped": dict(counter.skipped),
        "references": references,
    }
    _write_json(os.path.join(output_dir, name + SIDECAR_SUFFIX), sidecar)
    return sidecar


def caption_shard_set(
    loaded: LoadedModel,
    input_shards: str | Sequence[str],
    output_dir: str,
    decoding: Decoding = Decoding(),
    teacher: dict[str, Any] | None = None,
    part: int = 0,
    num_parts: int = 1,
    log=print,
) -> dict[str, Any]:
    """Captions every input shard of this part (shards `part`, `part + num_parts`, ...) that
    has no finished output yet; when all shards of the set are done, writes references.json
    and caption_summary.json. Returns the summary of what is done so far."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, {num_parts}), got {part}")
    shards = expand_paths(input_shards, ".tar")
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (one output per input)")
    os.makedirs(output_dir, exist_ok=True)
    teacher = {**(teacher or {}), **decoding.describe()}
    for shard in shards[part::num_parts]:
        done = os.path.join(output_dir, os.path.basename(shard))
        if os.path.exists(done) and os.path.exists(done + SIDECAR_SUFFIX):
            log(f"{os.path.basename(shard)}: already captioned, skipped")
            continue
        sidecar = caption_shard(loaded, shard, output_dir, decoding, teacher)
        skipped = sum(sidecar["skipped"].values())
        log(f"{os.path.basename(shard)}: {sidecar['written']} captioned, {skipped} skipped")
    return summarize(output_dir, names, teacher)


def summarize(output_dir: str, names: Sequence[str], teacher: dict[str, Any]) -> dict[str, Any]:
    """Totals over the finished shards; references.json and the summary file once all are."""
    sidecars = {}
    for name in names:
        path = os.path.join(output_dir, name + SIDECAR_SUFFIX)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                sidecars[name] = json.load(f)
    skipped: dict[str, int] = {}
    for sidecar in sidecars.values():
        for reason, n in sidecar["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    summary = {
        "output_dir": output_dir,
        "shards_done": len(sidecars),
        "shards_total": len(names),
        "written": sum(s["written"] for s in sidecars.values()),
        "teacher_wrote_nothing": sum(s["teacher_wrote_nothing"] for s in sidecars.values()),
        "skipped": skipped,
        "teacher": teacher,
    }
    if len(sidecars) == len(names):
        images, annotations = [], []
        for name in names:
            for key, captions in sidecars[name]["references"].items():
                images.append({"id": key, "file_name": key})
                for caption in captions:
                    annotations.append(
                        {"image_id": key, "id": len(annotations) + 1, "caption": caption}
                    )
        references = {
            "info": {"description": "original captions of a captioned shard set"},
            "licenses": [],
            "type": "captions",
            "images": images,
            "annotations": annotations,
        }
        _write_json(os.path.join(output_dir, REFERENCES_NAME), references)
        _write_json(os.path.join(output_dir, SUMMARY_NAME), summary)
    return summary


def _write_json(path: str, payload: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(path + ".tmp", path)

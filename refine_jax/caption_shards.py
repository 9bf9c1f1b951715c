"""Caption a shard set with a trained checkpoint: the one way to write a teacher's captions.

Every input tar shard becomes an output shard of the same name in the same img2dataset layout
(`KEY.jpg`, `KEY.txt`, `KEY.json`). `KEY.json` keeps the sample's original `captions` and adds
the model's under `teacher_captions` (and, for a refinement model, every step under
`teacher_steps`), with `teacher` naming the checkpoint and decoding. Uses: sequence-level
distillation (train on the teacher's captions, `config.data.teacher_caption_rate`), and
caption filtering, which scores these captions next to the originals.

Shards are written as `refine_jax.data.shard_sets` describes (resumable, parallel parts), with a
`NAME.tar.captioned.json` sidecar of counts. Bad samples are skipped and counted by reason;
`references.json` (the original captions) and `caption_summary.json` (the totals) are written
when every shard is done.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from refine_jax.data import shard_sets
from refine_jax.data.pipeline import preprocess_image
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, decode_image
from refine_jax.data.shard_writer import add_member
from refine_jax.evaluation.caption_images import describe_images
from refine_jax.model_loading import LoadedModel

SIDECAR_SUFFIX = ".captioned.json"
SUMMARY_NAME = "caption_summary.json"
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
    records, counter = shard_sets.read_good_records(shard)
    size = loaded.config.model.image_size
    images = [preprocess_image(decode_image(r["image_bytes"]), size) for r in records]
    texts = (
        describe_images(loaded, np.stack(images), method=decoding.method, beam=decoding.beam)
        if images
        else []
    )

    written, empty, references = 0, 0, {}
    with shard_sets.temporary_shard(output_dir, shard) as tar:
        for record, steps in zip(records, texts, strict=True):
            caption = steps[-1].strip()
            if not caption:  # the teacher wrote nothing: keep the sample, without a caption
                empty += 1
            meta = {
                "key": record["key"],
                "captions": list(record["captions"]),
                TEACHER_CAPTIONS_FIELD: [caption] if caption else [],
                "teacher": teacher,
            }
            if len(steps) > 1:
                meta["teacher_steps"] = list(steps)
            add_sample(tar, record, record["captions"][0], meta)
            references[record["key"]] = list(record["captions"])
            written += 1
    sidecar = {
        "input": shard,
        "written": written,
        "teacher_wrote_nothing": empty,
        "skipped": dict(counter.skipped),
        "references": references,
    }
    shard_sets.finish(output_dir, shard, SIDECAR_SUFFIX, sidecar, teacher)
    return sidecar


def add_sample(tar: tarfile.TarFile, record: dict, caption: str, meta: dict[str, Any]) -> None:
    """A record's image bytes as they were, its caption as KEY.txt and `meta` as KEY.json."""
    key, image_bytes = record["key"], record["image_bytes"]
    add_member(tar, f"{key}.{_image_extension(image_bytes)}", image_bytes)
    add_member(tar, f"{key}.txt", caption.encode("utf-8"))
    add_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))


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
    teacher = {**(teacher or {}), **decoding.describe()}
    shards, sidecars = shard_sets.rewrite_part(
        input_shards,
        output_dir,
        part,
        num_parts,
        SIDECAR_SUFFIX,
        teacher,  # the teacher and its decoding decide every shard's captions
        lambda shard: caption_shard(loaded, shard, output_dir, decoding, teacher),
        lambda c: f"{c['written']} captioned, {sum(c['skipped'].values())} skipped",
        "captioned",
        log,
    )
    summary = {
        "output_dir": output_dir,
        "shards_done": len(sidecars),
        "shards_total": len(shards),
        "written": sum(s["written"] for s in sidecars.values()),
        "teacher_wrote_nothing": sum(s["teacher_wrote_nothing"] for s in sidecars.values()),
        "skipped": shard_sets.summed_counts(sidecars, "skipped"),
        "teacher": teacher,
    }
    shard_sets.complete_set(
        output_dir,
        shards,
        sidecars,
        summary,
        SUMMARY_NAME,
        "original captions of a captioned shard set",
    )
    return summary

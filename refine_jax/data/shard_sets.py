"""Rewriting a shard set one shard at a time, as captioning and filtering shards do.

Each input shard becomes an output shard of the same name, written to `NAME.tar.tmp` and renamed
when complete, with a `NAME.tar<suffix>` JSON sidecar of its counts: a shard with both is done,
so a re-run skips it (resumable), and `part`/`num_parts` split the shards between independent
processes (parallel). Each sidecar records the settings its shard was written with (the
threshold, the teacher and its decoding); a run with other settings refuses an output folder
that already holds shards, so that one set never mixes two. The output folder may be local or
a URI (`gs://...`): paths go through epath. When every shard is done, the set's original
captions are written as a COCO-style `references.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from etils import epath

from refine_jax.data.records import SkipCounter, is_record
from refine_jax.data.shard_writer import REFERENCES_NAME
from refine_jax.data.shards import TarShardSource, expand_paths
from refine_jax.paths import write_atomically


def shards_of_part(
    input_shards: str | Sequence[str], part: int, num_parts: int
) -> tuple[list[str], list[str]]:
    """(every shard of the set, the shards of this part: part, part + num_parts, ...)."""
    if not 0 <= part < num_parts:
        raise ValueError(f"part must be in [0, {num_parts}), got {part}")
    shards = expand_paths(input_shards, ".tar")
    names = [os.path.basename(s) for s in shards]
    if len(set(names)) != len(names):
        raise ValueError("input shards must have distinct file names (one output per input)")
    return shards, shards[part::num_parts]


def output_path(output_dir: str, shard: str, suffix: str = "") -> epath.Path:
    """The output of input `shard` (its file name in `output_dir`), with `suffix` appended."""
    return epath.Path(output_dir) / (os.path.basename(shard) + suffix)


def is_done(output_dir: str, shard: str, suffix: str) -> bool:
    return (
        output_path(output_dir, shard).exists() and output_path(output_dir, shard, suffix).exists()
    )


@contextlib.contextmanager
def temporary_shard(output_dir: str, shard: str) -> Iterator[tarfile.TarFile]:
    """The tar that input `shard`'s output is written to until it is complete (`finish`)."""
    with output_path(output_dir, shard, ".tmp").open("wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            yield tar


def finish(
    output_dir: str, shard: str, suffix: str, sidecar: dict[str, Any], settings: dict[str, Any]
) -> None:
    """Renames the complete temporary shard into place, then writes its sidecar with the
    settings it was written with (done)."""
    output_path(output_dir, shard, ".tmp").replace(output_path(output_dir, shard))
    recorded = {**sidecar, "settings": as_recorded(settings)}
    write_atomically(output_path(output_dir, shard, suffix), json.dumps(recorded))


def read_sidecars(output_dir: str, shards: Sequence[str], suffix: str) -> dict[str, dict]:
    """The sidecars of the done shards, by shard name."""
    sidecars = {}
    for shard in shards:
        path = output_path(output_dir, shard, suffix)
        if path.exists():
            sidecars[os.path.basename(shard)] = json.loads(path.read_text(encoding="utf-8"))
    return sidecars


def summed_skips(sidecars: dict[str, dict]) -> dict[str, int]:
    skipped: dict[str, int] = {}
    for sidecar in sidecars.values():
        for reason, n in sidecar["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    return skipped


def write_references(output_dir: str, sidecars: Sequence[dict], description: str) -> None:
    """references.json of the captions the sidecars record (`references`: key -> captions)."""
    images, annotations = [], []
    for sidecar in sidecars:
        for key, captions in sidecar["references"].items():
            images.append({"id": key, "file_name": key})
            for caption in captions:
                annotations.append(
                    {"image_id": key, "id": len(annotations) + 1, "caption": caption}
                )
    references = {
        "info": {"description": description},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }
    write_atomically(epath.Path(output_dir) / REFERENCES_NAME, json.dumps(references))


def read_good_records(shard: str) -> tuple[list[dict], SkipCounter]:
    """Every usable record of a shard (images verified), and the counts of what was skipped."""
    counter = SkipCounter()
    source = TarShardSource(shard, verify_images=True)
    counter.merge(source.structural_counts())
    records = []
    for i in range(len(source)):
        element = source[i]
        if counter.observe(element) and is_record(element):
            records.append(element)
    source.close()
    return records, counter


def as_recorded(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as a sidecar records them (JSON types: tuples become lists)."""
    return json.loads(json.dumps(settings))


def check_settings(
    output_dir: str, shards: Sequence[str], suffix: str, settings: dict[str, Any]
) -> None:
    """ValueError when a done shard of the set was written with other settings."""
    wanted = as_recorded(settings)
    for name, sidecar in read_sidecars(output_dir, shards, suffix).items():
        recorded = sidecar.get("settings", "not recorded (an earlier version wrote it)")
        if recorded != wanted:
            raise ValueError(
                f"{output_dir} already holds {name} written with other settings ({recorded}; "
                f"this run: {wanted}): resume with those settings, or write to another output "
                "folder"
            )


def rewrite_part(
    input_shards: str | Sequence[str],
    output_dir: str,
    part: int,
    num_parts: int,
    suffix: str,
    settings: dict[str, Any],
    rewrite: Callable[[str], dict[str, Any]],
    describe: Callable[[dict[str, Any]], str],
    done_word: str,
    log: Callable[[str], Any] = print,
) -> tuple[list[str], dict[str, dict]]:
    """Runs `rewrite(shard) -> sidecar` (which ends with `finish(..., settings)`) on every
    shard of this part that is not done yet, logging `describe(sidecar)` per shard; returns
    (every shard of the set, the sidecars of the done ones by shard name). Shards done with
    other settings are a ValueError (`check_settings`)."""
    shards, mine = shards_of_part(input_shards, part, num_parts)
    check_settings(output_dir, shards, suffix, settings)
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    for shard in mine:
        if is_done(output_dir, shard, suffix):
            log(f"{os.path.basename(shard)}: already {done_word}, skipped")
            continue
        log(f"{os.path.basename(shard)}: {describe(rewrite(shard))}")
    return shards, read_sidecars(output_dir, shards, suffix)


def complete_set(
    output_dir: str,
    shards: Sequence[str],
    sidecars: dict[str, dict],
    summary: dict[str, Any],
    summary_name: str,
    description: str,
) -> None:
    """Once every shard is done: references.json (`description`) and the set's summary file."""
    if len(sidecars) == len(shards):
        write_references(output_dir, list(sidecars.values()), description)
        write_atomically(epath.Path(output_dir) / summary_name, json.dumps(summary))

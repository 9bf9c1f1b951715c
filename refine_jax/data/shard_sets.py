"""Rewriting a shard set one shard at a time, as captioning and filtering shards do.

Each input shard becomes an output shard of the same name, written to `NAME.tar.tmp` and renamed
when complete, with a `NAME.tar<suffix>` JSON sidecar of its counts: a shard with both is done,
so a re-run skips it (resumable), and `part`/`num_parts` split the shards between independent
processes (parallel). Each sidecar records the settings its shard was written with (the
threshold, the teacher and its decoding); a run with other settings refuses an output folder
that already holds shards, so that one set never mixes two. Parallel parts started at the same
time see none of each other's shards at first: each part re-checks before every shard and when
it ends, and a set whose shards were written with two settings is refused when completed, with
no summary nor references written. The output folder may be local or a URI (`gs://...`): paths
go through epath. When every shard is done, the set's original captions are written as a
COCO-style `references.json`.
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


def summed_counts(sidecars: dict[str, dict], field: str) -> dict[str, int]:
    """The sidecars' `field` counts by reason, summed (a sidecar without the field: none)."""
    summed: dict[str, int] = {}
    for sidecar in sidecars.values():
        for reason, n in sidecar.get(field, {}).items():
            summed[reason] = summed.get(reason, 0) + n
    return summed


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


NOT_RECORDED = "not recorded (an earlier version wrote it)"


def recorded_settings(sidecar: dict[str, Any]) -> Any:
    """The settings a sidecar's shard was written with."""
    return sidecar.get("settings", NOT_RECORDED)


def check_settings(
    output_dir: str,
    shards: Sequence[str],
    suffix: str,
    settings: dict[str, Any],
    checked: set[str] | None = None,
) -> None:
    """ValueError when a done shard of the set was written with other settings. The names of
    shards found right are added to `checked`, and those already there are not read again, so
    re-checking before every shard lists the folder once rather than reading every sidecar."""
    wanted = as_recorded(settings)
    checked = set() if checked is None else checked
    folder = epath.Path(output_dir)
    listed = {path.name for path in folder.glob("*" + suffix)} if folder.exists() else set()
    unread = [
        shard
        for shard in shards
        if os.path.basename(shard) not in checked and os.path.basename(shard) + suffix in listed
    ]
    for name, sidecar in read_sidecars(output_dir, unread, suffix).items():
        recorded = recorded_settings(sidecar)
        if recorded != wanted:
            raise ValueError(
                f"{output_dir} already holds {name} written with other settings ({recorded}; "
                f"this run: {wanted}): resume with those settings, or write to another output "
                "folder"
            )
        checked.add(name)


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
    other settings are a ValueError (`check_settings`), checked before every shard and once
    more at the end: a part started at the same time with other settings shows only then."""
    shards, mine = shards_of_part(input_shards, part, num_parts)
    checked: set[str] = set()
    check_settings(output_dir, shards, suffix, settings, checked)
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    for shard in mine:
        if is_done(output_dir, shard, suffix):
            log(f"{os.path.basename(shard)}: already {done_word}, skipped")
            continue
        check_settings(output_dir, shards, suffix, settings, checked)
        log(f"{os.path.basename(shard)}: {describe(rewrite(shard))}")
    check_settings(output_dir, shards, suffix, settings, checked)
    return shards, read_sidecars(output_dir, shards, suffix)


def complete_set(
    output_dir: str,
    shards: Sequence[str],
    sidecars: dict[str, dict],
    summary: dict[str, Any],
    summary_name: str,
    description: str,
    settings: dict[str, Any] | None = None,
) -> None:
    """Once every shard is done: references.json (`description`) and the set's summary file.
    A ValueError, and neither file, when the shards were written with different settings (or
    with others than `settings`, where given): the summary would claim one for them all."""
    if len(sidecars) == len(shards):
        check_one_setting(output_dir, sidecars, settings)
        write_references(output_dir, list(sidecars.values()), description)
        write_atomically(epath.Path(output_dir) / summary_name, json.dumps(summary))


def check_one_setting(
    output_dir: str, sidecars: dict[str, dict], settings: dict[str, Any] | None = None
) -> None:
    """ValueError naming two shards written with different settings (or one written with
    other settings than `settings`, where given)."""
    if not sidecars:
        return
    if settings is not None:
        source, expected = "this run", as_recorded(settings)
    else:
        source, first = next(iter(sidecars.items()))
        expected = recorded_settings(first)
    for name, sidecar in sidecars.items():
        recorded = recorded_settings(sidecar)
        if recorded != expected:
            raise ValueError(
                f"{output_dir} mixes shards written with different settings: {name} with "
                f"{recorded}, {source} with {expected}; no summary nor references written. "
                "Re-run the shards of one setting into another output folder"
            )

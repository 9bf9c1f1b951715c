"""A shard split scored against a COCO-style references file (`--mode=eval --eval_data=...`)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from refine_jax.data.records import is_record
from refine_jax.data.shards import TarShardSource, load_references
from refine_jax.errors import DataError


class ReferencedShards:
    """A shard split scored against a COCO-style references file: the good records of the
    shards, in order, each with all of its references (`load_references`); bad samples are
    counted in `skipped` and left out. An image the references file does not list (or lists
    without captions) keeps the captions of its shard sample, counted as
    `references_from_shard`. `limit` > 0 keeps the first `limit` samples of the shards."""

    def __init__(self, path: str | os.PathLike, num_threads: int = 4, limit: int = 0):
        self.path = os.fspath(path)
        self.source = TarShardSource(self.path)
        self.references = load_references(self.path)
        # Every image is decoded once here, so a corrupt one is left out rather than failing
        # the evaluation half way.
        with ThreadPoolExecutor(max(1, num_threads)) as pool:
            count = min(limit, len(self.source)) if limit > 0 else len(self.source)
            checked = list(pool.map(self.source.read, range(count)))
        self.counts = self.source.structural_counts().observe_all(checked)
        self.skipped = dict(self.counts.skipped)
        self.indices = [i for i, element in enumerate(checked) if is_record(element)]
        self.references_from_shard = sum(
            not self.references.get(checked[i]["key"]) for i in self.indices
        )
        if self.indices and self.references_from_shard == len(self.indices):
            first = checked[self.indices[0]]["key"]
            raise DataError(
                f"the references beside {self.path} list none of its {len(self.indices)} images "
                f"(e.g. key {first!r}; {len(self.references)} image ids in the file): the "
                "references.json belongs to other shards, or its image ids are not the KEYs"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        record = self.source.read(self.indices[index], verify_image=False)
        captions = self.references.get(record["key"]) or record["captions"]
        return {
            "key": record["key"],
            "image_bytes": record["image_bytes"],
            "captions": list(captions),
        }


__all__ = ["ReferencedShards"]

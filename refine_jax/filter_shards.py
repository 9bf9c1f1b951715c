"""Caption filtering of a noisy shard set with the matching model (DESIGN §11, BLIP's CapFilt).

For every sample, each of its captions (the web captions under `captions` and, on shards
written by `refine_jax.caption_shards`, a captioner's under `teacher_captions`) is scored with
the matching head: the probability that it describes the image. Captions scoring at least the
threshold are kept; the output shard (same name, same layout) holds each sample with a kept
caption: `captions` = the kept web and teacher captions (web first), `teacher_captions` = the
kept teacher ones, `match_scores` = every candidate with its origin, score, verdict and whether
it was cut to the matching model's canvas to be scored (`truncated`). A caption none of whose
words fits the canvas (a bare URL) is never scored (that would score the empty description): it
is dropped with score None and counted as `truncated_caption` (the training pipeline's name
for it) in `captions_dropped_by_reason`, next to `below_threshold`. A sample with no caption
kept is left out and counted. Shards are written as `data.shard_sets`
describes (resumable, parallel parts) with a `NAME.tar.filtered.json` sidecar; bad samples are
skipped and counted by reason; `references.json` (the kept captions) and
`filter_summary.json` (the totals) are written when every shard is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refine_jax.caption_shards import add_sample
from refine_jax.data import shard_sets
from refine_jax.data.pipeline import TRUNCATED_CAPTION, preprocess_image
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, decode_image
from refine_jax.evaluation.matching import MatchEmbedder

SIDECAR_SUFFIX = ".filtered.json"
SUMMARY_NAME = "filter_summary.json"
ORIGINS = ("web", "teacher")
BELOW_THRESHOLD = "below_threshold"  # a drop reason: the matching head's score is too low


def candidates(record: dict) -> list[tuple[str, str]]:
    """(origin, caption) of every distinct non-empty caption of a record, web ones first (a
    teacher caption that repeats a web one is scored and kept once, as web)."""
    seen, out = set(), []
    for origin, field in (("web", "captions"), ("teacher", TEACHER_CAPTIONS_FIELD)):
        for caption in record.get(field) or ():
            text = caption.strip()
            if text and text not in seen:
                seen.add(text)
                out.append((origin, text))
    return out


def filter_shard(
    embedder: MatchEmbedder,
    shard: str,
    output_dir: str,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """Filters one input shard into `output_dir` with the set's `settings` (its threshold and
    scorer); returns its sidecar (counts, kept captions)."""
    threshold = settings["threshold"]
    records, counter = shard_sets.read_good_records(shard)
    size = embedder.features.image_size
    per_record = [candidates(r) for r in records]
    fitted = {  # caption -> (the words of it the canvas holds, whether that cut any)
        text: embedder.features.fit_to_canvas(text) for pairs in per_record for _, text in pairs
    }
    scorable = [(i, text) for i, pairs in enumerate(per_record) for _, text in pairs]
    scorable = [(i, text) for i, text in scorable if fitted[text][0]]
    scores = np.zeros((0,), np.float32)
    if scorable:
        images = np.stack([preprocess_image(decode_image(r["image_bytes"]), size) for r in records])
        texts = [text for _, text in scorable]
        scores = embedder.match_probabilities(images, texts, [i for i, _ in scorable])
    score_of = {pair: float(score) for pair, score in zip(scorable, scores, strict=True)}

    scored = {origin: 0 for origin in ORIGINS}
    dropped = {origin: 0 for origin in ORIGINS}
    drop_reasons = {BELOW_THRESHOLD: 0, TRUNCATED_CAPTION: 0}
    written, no_caption_kept, references = 0, 0, {}
    with shard_sets.temporary_shard(output_dir, shard) as tar:
        for i, (record, pairs) in enumerate(zip(records, per_record, strict=True)):
            verdicts = []
            for origin, text in pairs:
                score = score_of.get((i, text))  # None: no word fits the canvas, not scored
                kept = score is not None and score >= threshold
                scored[origin] += score is not None
                dropped[origin] += not kept
                if not kept:
                    drop_reasons[BELOW_THRESHOLD if score is not None else TRUNCATED_CAPTION] += 1
                verdicts.append(
                    {
                        "caption": text,
                        "origin": origin,
                        "score": score,
                        "kept": kept,
                        "truncated": fitted[text][1],
                    }
                )
            kept = [v for v in verdicts if v["kept"]]
            if not kept:
                no_caption_kept += 1
                continue
            meta = {
                "key": record["key"],
                "captions": [v["caption"] for v in kept],
                TEACHER_CAPTIONS_FIELD: [v["caption"] for v in kept if v["origin"] == "teacher"],
                "match_scores": verdicts,
            }
            add_sample(tar, record, kept[0]["caption"], meta)
            references[record["key"]] = meta["captions"]
            written += 1
    sidecar = {
        "input": shard,
        "written": written,
        "no_caption_kept": no_caption_kept,
        "captions_scored": scored,
        "captions_dropped": dropped,
        "captions_dropped_by_reason": {k: n for k, n in drop_reasons.items() if n},
        "skipped": dict(counter.skipped),
        "references": references,
    }
    shard_sets.finish(output_dir, shard, SIDECAR_SUFFIX, sidecar, settings)
    return sidecar


def filter_shard_set(
    embedder: MatchEmbedder,
    input_shards: str | Sequence[str],
    output_dir: str,
    threshold: float = 0.5,
    part: int = 0,
    num_parts: int = 1,
    scorer: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Filters every input shard of this part that has no finished output yet; when all shards
    are done, writes references.json and filter_summary.json. Returns the summary so far."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"the threshold is a matching probability in [0, 1], got {threshold}")
    settings = {"threshold": threshold, "scorer": scorer or {}}
    shards, sidecars = shard_sets.rewrite_part(
        input_shards,
        output_dir,
        part,
        num_parts,
        SIDECAR_SUFFIX,
        settings,
        lambda shard: filter_shard(embedder, shard, output_dir, settings),
        lambda f: (
            f"{f['written']} kept, {f['no_caption_kept']} left out, "
            f"{sum(f['captions_dropped'].values())} captions dropped"
        ),
        "filtered",
        log,
    )
    total = lambda key: {o: sum(s[key][o] for s in sidecars.values()) for o in ORIGINS}
    summary = {
        "output_dir": output_dir,
        "threshold": threshold,
        "scorer": scorer or {},
        "shards_done": len(sidecars),
        "shards_total": len(shards),
        "written": sum(s["written"] for s in sidecars.values()),
        "no_caption_kept": sum(s["no_caption_kept"] for s in sidecars.values()),
        "captions_scored": total("captions_scored"),
        "captions_dropped": total("captions_dropped"),
        "captions_dropped_by_reason": shard_sets.summed_counts(
            sidecars, "captions_dropped_by_reason"
        ),
        "skipped": shard_sets.summed_counts(sidecars, "skipped"),
    }
    shard_sets.complete_set(
        output_dir,
        shards,
        sidecars,
        summary,
        SUMMARY_NAME,
        "captions kept by the matching model's filter",
        settings,
    )
    return summary

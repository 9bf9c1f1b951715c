"""Caption filtering with the matching model: the captioner's and the web captions scored by the
matching head, those under the threshold dropped and counted, output shards that read back with
the kept captions and every score, bad samples counted, resumable and split into parts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import jax
import numpy as np
import pytest
from test_caption_shards import make_input
from test_evaluate import trained_workdir

from refine_jax.caption_shards import caption_shard_set
from refine_jax.data.pipeline import preprocess_image
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, decode_image
from refine_jax.data.shards import TarShardSource
from refine_jax.evaluation.matching import MatchEmbedder
from refine_jax.filter_shards import SIDECAR_SUFFIX, candidates, filter_shard_set
from refine_jax.model_loading import load_model


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> Path:
    """Two shards of 3 samples (one corrupt image), captioned by the tiny refinement model."""
    root = tmp_path_factory.mktemp("filter")
    make_input(root / "in")
    captioner = load_model(None, trained_workdir(tmp_path_factory, "tiny"))
    caption_shard_set(captioner, str(root / "in"), str(root / "captioned"), log=lambda _: None)
    return root / "captioned"


@pytest.fixture(scope="module")
def matcher(tmp_path_factory):
    return load_model(None, trained_workdir(tmp_path_factory, "tiny,match"))


def json_members(folder: Path) -> dict[str, dict]:
    out = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    out[meta["key"]] = meta
    return out


def test_filtered_shards_keep_the_captions_scoring_above_the_threshold(
    captioned, matcher, tmp_path
):
    embedder = MatchEmbedder.from_loaded(matcher)
    source = TarShardSource(str(captioned), verify_images=True)
    records = {source[i]["key"]: source[i] for i in range(len(source))}
    with matcher.context():
        everything = filter_shard_set(embedder, str(captioned), str(tmp_path / "all"), 0.0)
    assert everything["written"] == 5 and everything["no_caption_kept"] == 0
    assert everything["captions_scored"]["web"] == 10  # two web captions per good sample
    teachers = sum(len(r.get(TEACHER_CAPTIONS_FIELD) or []) for r in records.values())
    assert everything["captions_scored"]["teacher"] == teachers
    scores = {
        (key, v["origin"], v["caption"]): v["score"]
        for key, meta in json_members(tmp_path / "all").items()
        for v in meta["match_scores"]
    }
    # The scores are the matching head's: recomputed for every pair straight from the model.
    size = matcher.config.model.image_size
    model, params = matcher.model, matcher.params
    for (key, _, caption), score in scores.items():
        image = preprocess_image(decode_image(records[key]["image_bytes"]), size)[None]
        tokens = embedder.text_tokens(caption)[None]
        logit = model.apply(
            {"params": params}, image, tokens, np.zeros(1, np.int32), method=model.pair_logits
        )
        assert score == pytest.approx(float(jax.nn.sigmoid(logit[0])), abs=1e-5)

    threshold = float(np.median(list(scores.values())))
    with matcher.context():
        summary = filter_shard_set(embedder, str(captioned), str(tmp_path / "out"), threshold)
    dropped = {
        o: sum(1 for (_, origin, _), s in scores.items() if origin == o and s < threshold)
        for o in ("web", "teacher")
    }
    assert summary["captions_dropped"] == dropped and sum(dropped.values()) > 0
    assert summary["skipped"] == {}  # captioning already left out the corrupt image
    kept = {}
    for (key, origin, caption), score in scores.items():
        if score >= threshold:
            kept.setdefault(key, []).append((origin, caption))
    assert summary["written"] == len(kept)
    assert summary["no_caption_kept"] == 5 - len(kept)
    # Read back: each written sample has its kept captions (web first), every scored candidate
    # with its verdict, and the kept teacher captions under their own field.
    out = TarShardSource(str(tmp_path / "out"), verify_images=True)
    read = {out[i]["key"]: out[i] for i in range(len(out))}
    assert set(read) == set(kept)
    metas = json_members(tmp_path / "out")
    for key, pairs in kept.items():
        assert read[key]["captions"] == [c for o, c in pairs if o == "web"] + [
            c for o, c in pairs if o == "teacher"
        ]
        assert read[key]["image_bytes"] == records[key]["image_bytes"]
        assert metas[key][TEACHER_CAPTIONS_FIELD] == [c for o, c in pairs if o == "teacher"]
        assert all(v["kept"] == (v["score"] >= threshold) for v in metas[key]["match_scores"])
    references = json.loads((tmp_path / "out" / "references.json").read_text())
    assert len(references["annotations"]) == sum(len(p) for p in kept.values())


def test_web_captions_alone_are_filtered_and_bad_samples_counted(captioned, matcher, tmp_path):
    # The uncaptioned input: web captions only, and one sample whose image is corrupt.
    embedder = MatchEmbedder.from_loaded(matcher)
    with matcher.context():
        summary = filter_shard_set(embedder, str(captioned.parent / "in"), str(tmp_path), 0.0)
    assert summary["skipped"] == {"corrupt_image": 1} and summary["written"] == 5
    assert summary["captions_scored"] == {"web": 10, "teacher": 0}


def test_filtering_resumes_and_splits_into_parts(captioned, matcher, tmp_path):
    embedder = MatchEmbedder.from_loaded(matcher)
    out = str(tmp_path / "out")
    logs = []
    with matcher.context():
        first = filter_shard_set(embedder, str(captioned), out, 0.3, part=0, num_parts=2)
        assert first["shards_done"] == 1 and not (tmp_path / "out" / "filter_summary.json").exists()
        second = filter_shard_set(embedder, str(captioned), out, 0.3, part=1, num_parts=2)
        assert second["shards_done"] == 2 and (tmp_path / "out" / "filter_summary.json").exists()
        again = filter_shard_set(embedder, str(captioned), out, 0.3, log=logs.append)
    assert all("already filtered" in line for line in logs) and len(logs) == 2
    assert again == second
    # Another threshold would mix two filters in one set: refused, the shards left as they are.
    with pytest.raises(ValueError, match="other settings .*'threshold': 0.3.*this run: .*0.9"):
        filter_shard_set(embedder, str(captioned), out, 0.9)
    sidecars = sorted((tmp_path / "out").glob("*" + SIDECAR_SUFFIX))
    assert len(sidecars) == 2
    with pytest.raises(ValueError, match="threshold"):
        filter_shard_set(embedder, str(captioned), out, 1.5)
    with pytest.raises(ValueError, match="part"):
        filter_shard_set(embedder, str(captioned), out, 0.3, part=2, num_parts=2)


def test_each_distinct_caption_is_a_candidate_once_web_before_teacher():
    record = {"captions": ["a dog", " a dog ", ""], TEACHER_CAPTIONS_FIELD: ["a dog", "a cat"]}
    assert candidates(record) == [("web", "a dog"), ("teacher", "a cat")]

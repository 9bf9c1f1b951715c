"""Caption filtering with the matching model: the captioner's and the web captions scored by the
matching head, those under the threshold dropped and counted, output shards that read back with
the kept captions and every score, bad samples counted, resumable and split into parts."""

from __future__ import annotations

import json
import tarfile
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from test_caption_shards import jpeg, make_input
from test_evaluate import trained_workdir

from refine_jax.caption_shards import caption_shard_set
from refine_jax.data import shard_sets
from refine_jax.data.pipeline import TRUNCATED_CAPTION, CaptionFeatures, preprocess_image
from refine_jax.data.records import TEACHER_CAPTIONS_FIELD, decode_image
from refine_jax.data.shard_writer import ShardWriter
from refine_jax.data.shards import TarShardSource
from refine_jax.evaluation.matching import MatchEmbedder
from refine_jax.filter_shards import (
    SIDECAR_SUFFIX,
    SUMMARY_NAME,
    candidates,
    filter_shard_set,
)
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


class CharacterTokenizer:
    """One token per character: how many words of a caption fit a canvas is plain to see."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]


class StubEmbedder:
    """A matching model whose head gives every pair `score`, on a 12-character canvas cut by the
    pipeline's own `fit_to_canvas`; records the texts it scores. `on_first_call` runs once,
    while the first shard is being scored (another part working at the same time)."""

    def __init__(self, score: float = 0.9, on_first_call=None):
        self.score, self.on_first_call, self.scored = score, on_first_call, []
        canvas = types.SimpleNamespace(tokenizer=CharacterTokenizer(), canvas_length=12)
        self.features = types.SimpleNamespace(
            image_size=8, fit_to_canvas=lambda text: CaptionFeatures.fit_to_canvas(canvas, text)
        )

    def match_probabilities(self, images, texts, owner) -> np.ndarray:
        if self.on_first_call is not None:
            call, self.on_first_call = self.on_first_call, None
            call()
        self.scored.extend(texts)
        return np.full(len(texts), self.score, np.float32)


URL = "https://example.com/images/2023/a_very_long_file_name.jpg"


def test_a_caption_with_no_word_on_the_canvas_is_dropped_not_scored_as_the_empty_description(
    tmp_path,
):
    # A URL-only web caption: not one word fits the canvas, so the head would read the empty
    # description. It is never scored, dropped as `truncated_caption`; a caption cut to the
    # canvas is scored on what fits and marked `truncated`.
    with ShardWriter(tmp_path / "in", samples_per_shard=2) as writer:
        for i in range(2):
            writer.write(f"s{i}", jpeg(i), [f"picture {i}", f"a photo number {i}", URL])
    embedder = StubEmbedder()
    summary = filter_shard_set(embedder, str(tmp_path / "in"), str(tmp_path / "out"), 0.5)
    assert URL not in embedder.scored and len(embedder.scored) == 4
    assert summary["captions_scored"] == {"web": 4, "teacher": 0}
    assert summary["captions_dropped"] == {"web": 2, "teacher": 0}
    assert summary["captions_dropped_by_reason"] == {TRUNCATED_CAPTION: 2}
    for i, meta in enumerate(json_members(tmp_path / "out").values()):
        assert meta["captions"] == [f"picture {i}", f"a photo number {i}"]
        verdicts = {v["caption"]: v for v in meta["match_scores"]}
        assert verdicts[URL] == {
            "caption": URL,
            "origin": "web",
            "score": None,
            "kept": False,
            "truncated": True,
        }
        assert verdicts[f"a photo number {i}"]["truncated"]  # scored as "a photo"
        assert not verdicts[f"picture {i}"]["truncated"]


def test_parallel_parts_with_different_thresholds_are_refused_not_mixed(tmp_path):
    # Part 1 (threshold 0.9) runs while part 0 (0.3) scores its first shard: neither saw the
    # other's shards when it started. Part 0 refuses the set when it ends, naming both
    # thresholds, and no summary nor references claim one threshold for both.
    make_input(tmp_path / "in")
    inputs, out = str(tmp_path / "in"), str(tmp_path / "out")
    quiet = lambda _: None
    other_part = lambda: filter_shard_set(StubEmbedder(), inputs, out, 0.9, 1, 2, log=quiet)
    with pytest.raises(ValueError, match=r"'threshold': 0.9.*this run: .*'threshold': 0.3"):
        filter_shard_set(StubEmbedder(on_first_call=other_part), inputs, out, 0.3, 0, 2, log=quiet)
    assert len(list((tmp_path / "out").glob("*" + SIDECAR_SUFFIX))) == 2
    assert not (tmp_path / "out" / SUMMARY_NAME).exists()
    assert not (tmp_path / "out" / "references.json").exists()


def test_a_set_of_shards_written_with_two_settings_is_never_completed(tmp_path):
    sidecars = {
        name: {"references": {name: ["a caption"]}, "settings": {"threshold": threshold}}
        for name, threshold in (("a.tar", 0.3), ("b.tar", 0.9))
    }
    with pytest.raises(ValueError, match=r"b.tar with \{'threshold': 0.9\}.*0.3"):
        shard_sets.complete_set(
            str(tmp_path), ["a.tar", "b.tar"], sidecars, {}, SUMMARY_NAME, "test"
        )
    assert not list(tmp_path.iterdir())

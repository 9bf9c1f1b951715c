"""The matching model end to end: its own eval (retrieval recall), and as the yardstick of a
captioner's eval (gradualness by its image posteriors, per-step scores) and caption mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_caption_mode import make_images
from test_evaluate import run_main, trained_workdir

from refine_jax.data import make_sources
from refine_jax.evaluation.caption_images import step_match_scores
from refine_jax.evaluation.matching import (
    MatchEmbedder,
    calibration,
    calibration_chains,
    posterior_progress,
    retrieval_recall,
)
from refine_jax.evaluation.refinement_metrics import refinement_metrics
from refine_jax.model_loading import load_model


@pytest.fixture(scope="module")
def match_workdir(tmp_path_factory):
    return trained_workdir(tmp_path_factory, "tiny,match")


def test_eval_of_a_matching_model_is_retrieval_recall_of_the_held_out_split(match_workdir):
    result = run_main(f"--workdir={match_workdir}", "--mode=eval", "--eval_name=retrieval")
    metrics = json.loads((match_workdir / "eval" / "retrieval" / "metrics.json").read_text())
    assert metrics["model_kind"] == "match" and metrics["num_images"] == 32
    assert "image_to_text_r@5" in result.stdout
    # Recomputed from the model's own embeddings of the split's images and captions.
    loaded = load_model(None, match_workdir)
    _, source = make_sources(loaded.config)
    embedder = MatchEmbedder.from_loaded(loaded)
    with loaded.context():
        records, images = embedder.embed_split(source)
        texts = embedder.embed_texts([r["captions"][0] for r in records])
    expected = retrieval_recall(images, texts, np.arange(len(records)))
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key
    for way in ("image_to_text", "text_to_image"):
        assert metrics[f"{way}_r@1"] <= metrics[f"{way}_r@5"] <= metrics[f"{way}_r@10"]


def test_captioner_eval_with_a_matching_model_measures_gradualness_in_its_text_space(
    tmp_path_factory, match_workdir
):
    workdir = trained_workdir(tmp_path_factory, "tiny")
    run_main(f"--workdir={workdir}", "--mode=eval", "--eval_name=tfidf")
    result = run_main(
        f"--workdir={workdir}",
        "--mode=eval",
        "--eval_name=matched",
        f"--match_workdir={match_workdir}",
    )
    assert "(encoding: match)" in result.stdout and "image-text match score" in result.stdout
    plain = json.loads((workdir / "eval" / "tfidf" / "metrics.json").read_text())
    matched = json.loads((workdir / "eval" / "matched" / "metrics.json").read_text())
    assert plain["gradualness_encoding"] == "tfidf" and matched["gradualness_encoding"] == "match"
    assert matched["gradualness_tfidf"] == pytest.approx(plain["gradualness"])
    assert matched["refine_score_tfidf"] == pytest.approx(plain["refine_score"])

    # G recomputed from the written captions: the matching model's posteriors over the split's
    # images, the blank description as the empty one.
    rows = [json.loads(x) for x in (workdir / "eval" / "matched" / "captions.jsonl").open()]
    loaded = load_model(None, match_workdir)
    embedder = MatchEmbedder.from_loaded(loaded)
    num_steps = matched["num_steps"]
    with loaded.context():
        records, images = embedder.embed_split(make_sources(loaded.config)[1])
        steps = embedder.embed_texts([t for r in rows for t in r["steps"]])
        blank = embedder.embed_texts([""])[0]
    assert [r["key"] for r in records] == [r["image_id"] for r in rows]
    progress = posterior_progress(
        steps.reshape(len(rows), num_steps, -1), blank, images, embedder.logit_scale
    )
    expected = refinement_metrics(
        {n: r["steps"] for n, r in enumerate(rows)},
        {n: r["references"] for n, r in enumerate(rows)},
        matched["schedule"],
        matched["weights"],
        step_progress=progress,
    )
    assert matched["gradualness"] == pytest.approx(expected["gradualness"], abs=1e-6)
    assert matched["refine_score"] == pytest.approx(expected["refine_score"], abs=1e-6)
    per_row = np.array([r["match_score_per_step"] for r in rows])  # [N, K]
    assert per_row.shape == (len(rows), num_steps) and np.all((0 <= per_row) & (per_row <= 1))
    assert matched["match_score_per_step"] == pytest.approx(per_row.mean(axis=0).tolist())
    with pytest.raises(ValueError, match="a matching model is needed"):
        MatchEmbedder.from_loaded(load_model(None, workdir))  # a captioner is no yardstick
    report = (workdir / "eval" / "matched" / "report.html").read_text()
    assert "<th>match</th>" in report and "<th>match score</th>" in report
    assert "<th>match</th>" not in (workdir / "eval" / "tfidf" / "report.html").read_text()


def test_caption_mode_scores_every_step_with_a_matching_model(
    tmp_path_factory, match_workdir, tmp_path
):
    workdir = trained_workdir(tmp_path_factory, "tiny")
    names = make_images(tmp_path / "photos")
    output = tmp_path / "captions.jsonl"
    result = run_main(
        f"--workdir={workdir}",
        "--mode=caption",
        f"--images={tmp_path / 'photos'}",
        f"--output={output}",
        f"--match_workdir={match_workdir}",
    )
    rows = [json.loads(x) for x in output.open()]
    assert [row["file"].rsplit("/", 1)[1] for row in rows] == names  # the good images
    for row in rows:
        scores = row["match_score_per_step"]
        assert len(scores) == len(row["steps"]) == 4 and all(0 <= s <= 1 for s in scores)
        fell = [k for k in range(1, 4) if scores[k] < scores[k - 1]]
        printed = [
            f"step {k + 1}:" in line and "fell" in line
            for k in fell
            for line in result.stdout.splitlines()
        ]
        assert sum(printed) >= len(fell)
    assert result.stdout.count("[match ") == 4 * len(rows)


def test_a_caption_run_whose_images_were_all_skipped_has_no_step_to_score(match_workdir):
    assert step_match_scores(match_workdir, [], []).shape == (0, 0)


def test_progress_is_the_share_of_the_final_descriptions_information_about_the_image():
    # Four images with orthogonal embeddings; the empty description is orthogonal to all of
    # them (its posterior is uniform over 4), step 1 fits images 0 and 1 equally (uniform over
    # 2), the final fits image 0 alone. At a large scale the posteriors are those uniform ones:
    # p_1 = log(4/2) / log(4/1) = 1/2.
    eye = np.eye(5)
    bank, blank = eye[:4], eye[4]
    both = (eye[0] + eye[1]) / np.sqrt(2)
    steps = np.stack([[both, both, eye[0], eye[0]], [eye[3], both, eye[0], eye[0]]])
    progress = posterior_progress(steps, blank, bank, logit_scale=100.0)
    assert progress[0] == pytest.approx([0.5, 0.5, 1.0, 1.0], abs=1e-12)
    # A step that points at another image than the final is further from it than the blank.
    assert progress[1, 0] < 0 and progress[1, 1:] == pytest.approx([0.5, 1.0, 1.0], abs=1e-12)
    # The same at a finite scale stays a fraction between the blank (0) and the final (1).
    soft = posterior_progress(steps, blank, bank, logit_scale=5.0)
    assert 0 < soft[0, 0] < 1 and soft[0, -1] == pytest.approx(1.0)
    # A final description whose posterior is the blank's has no span: NaN (a blank final).
    assert np.isnan(posterior_progress(np.stack([[blank, blank]]), blank, bank, 100.0)).all()
    # Scored a chunk of images at a time (bounded memory), the same numbers.
    many = np.random.default_rng(0).normal(size=(7, 3, 5))
    many /= np.linalg.norm(many, axis=-1, keepdims=True)
    whole = posterior_progress(many, blank, bank, 5.0, images_per_chunk=7)
    np.testing.assert_array_equal(posterior_progress(many, blank, bank, 5.0, 2), whole)


def test_calibration_scores_the_perfect_chain_above_the_two_that_do_not_refine(match_workdir):
    loaded = load_model(None, match_workdir)
    _, source = make_sources(loaded.config)
    salience = loaded.tokenizer.salience
    chains = calibration_chains("a large red circle above a small blue square", salience, 4)
    assert chains["blank_until_last"] == ["", "", "", chains["perfect"][-1]]
    assert chains["complete_at_first"] == [chains["perfect"][-1]] * 4
    assert chains["perfect"][-1] == "a large red circle above a small blue square"
    for shorter, longer in zip(chains["perfect"], chains["perfect"][1:], strict=False):
        assert set(shorter.split()) <= set(longer.split()) and len(shorter) < len(longer)
    embedder = MatchEmbedder.from_loaded(loaded)
    with loaded.context():
        result = calibration(embedder, source, salience)
        split_images = embedder.embed_split(source)[1]
        doubled = calibration(embedder, source, salience, extra_bank=split_images)
        other = np.random.default_rng(0).normal(size=split_images.shape).astype(np.float32)
        widened = calibration(
            embedder, source, salience, extra_bank=other / np.linalg.norm(other, axis=1)[:, None]
        )
    # Every bank image twice is the same posterior; other images in the bank change it.
    for name, scores in result.items():
        assert doubled[name]["gradualness"] == pytest.approx(scores["gradualness"], abs=1e-9)
    assert widened["perfect"]["progress_per_step"] != pytest.approx(
        result["perfect"]["progress_per_step"], abs=1e-6
    )
    for name in ("blank_until_last", "complete_at_first"):  # no path: at the bottom, every way
        for suffix in ("", "_cosine", "_tfidf"):
            assert result[name][f"gradualness{suffix}"] == pytest.approx(0.0, abs=1e-9)
    assert result["perfect"]["gradualness"] > 0.2  # even a 20-step model sees a path
    assert result["perfect"]["progress_per_step"][-1] == pytest.approx(1.0)

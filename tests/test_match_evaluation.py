"""The matching model end to end: its own eval (retrieval recall), and as the yardstick of a
captioner's eval (gradualness in its text space, per-step scores) and caption mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_caption_mode import make_images
from test_evaluate import run_main, trained_workdir

from refine_jax.data import make_sources
from refine_jax.evaluation.matching import (
    MatchEmbedder,
    calibration,
    calibration_chains,
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
    assert "match text space" in result.stdout and "image-text match score" in result.stdout
    plain = json.loads((workdir / "eval" / "tfidf" / "metrics.json").read_text())
    matched = json.loads((workdir / "eval" / "matched" / "metrics.json").read_text())
    assert plain["gradualness_encoding"] == "tfidf" and matched["gradualness_encoding"] == "match"
    assert matched["gradualness_tfidf"] == pytest.approx(plain["gradualness"])
    assert matched["refine_score_tfidf"] == pytest.approx(plain["refine_score"])

    # G recomputed from the written captions, encoded by the matching model, the blank
    # description as the empty one.
    rows = [json.loads(x) for x in (workdir / "eval" / "matched" / "captions.jsonl").open()]
    loaded = load_model(None, match_workdir)
    embedder = MatchEmbedder.from_loaded(loaded)
    num_steps = matched["num_steps"]
    with loaded.context():
        steps = embedder.embed_texts([t for r in rows for t in r["steps"]])
        blank = embedder.embed_texts([""])[0]
    expected = refinement_metrics(
        {n: r["steps"] for n, r in enumerate(rows)},
        {n: r["references"] for n, r in enumerate(rows)},
        matched["schedule"],
        matched["weights"],
        step_vectors=steps.reshape(len(rows), num_steps, -1),
        blank_vector=blank,
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


def test_calibration_scores_the_perfect_chain_above_the_two_that_do_not_refine(match_workdir):
    loaded = load_model(None, match_workdir)
    _, source = make_sources(loaded.config)
    references = [source[i]["captions"] for i in range(16)]
    salience = loaded.tokenizer.salience
    chains = calibration_chains("a large red circle above a small blue square", salience, 4)
    assert chains["blank_until_last"] == ["", "", "", chains["perfect"][-1]]
    assert chains["complete_at_first"] == [chains["perfect"][-1]] * 4
    assert chains["perfect"][-1] == "a large red circle above a small blue square"
    for shorter, longer in zip(chains["perfect"], chains["perfect"][1:], strict=False):
        assert set(shorter.split()) <= set(longer.split()) and len(shorter) < len(longer)
    with loaded.context():
        result = calibration(MatchEmbedder.from_loaded(loaded), references, salience)
    for name in ("blank_until_last", "complete_at_first"):  # no path: at the bottom, both ways
        assert result[name]["gradualness"] == pytest.approx(0.0, abs=1e-9)
        assert result[name]["gradualness_tfidf"] == pytest.approx(0.0, abs=1e-9)
    assert result["perfect"]["gradualness"] > 0.2  # even a 20-step model sees a path
    assert result["perfect"]["progress_per_step"][-1] == pytest.approx(1.0)

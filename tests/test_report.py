"""The HTML report: attention heatmaps land where the attention is, the word diff, the image
selection, and the page renders in headless Chromium with no console error and every image
loaded (skipped, with the reason, where Chromium is not installed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config
from PIL import Image
from test_evaluate import trained_workdir

from refine_jax import train
from refine_jax.decoding import last_layer_attention
from refine_jax.evaluation.attention import (
    added_word_indices,
    added_words_attention,
    attention_overlay,
    token_word_indices,
    upsample_attention,
    word_diff,
)
from refine_jax.evaluation.evaluate import evaluate_checkpoint, load_model
from refine_jax.evaluation.report import (
    ReportImage,
    check_in_browser,
    diff_html,
    find_chromium,
    render_report,
    select_images,
    write_report,
)
from refine_jax.model_kinds import build_model, decode_batch, describe_with_attention
from refine_jax.special_tokens import PAD_ID
from refine_jax.tokenizer import train_tokenizer

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="headless Chromium not installed (Debian: apt-get install -y chromium)",
)


@pytest.mark.parametrize("row,col", [(0, 0), (1, 2), (3, 3)])
def test_heatmap_of_one_patch_lands_on_that_patch(row, col):
    grid, size = 4, 48  # 4 x 4 patches of 12 x 12 pixels
    attention = np.full(grid * grid, 0.01)
    attention[row * grid + col] = 1.0  # row-major, as the ViT flattens the patches
    heat = upsample_attention(attention, size)
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    assert row * 12 <= peak[0] < (row + 1) * 12 and col * 12 <= peak[1] < (col + 1) * 12
    block = heat[row * 12 : (row + 1) * 12, col * 12 : (col + 1) * 12]
    outside = np.ones_like(heat, bool)
    outside[row * 12 : (row + 1) * 12, col * 12 : (col + 1) * 12] = False
    assert block.mean() > 4 * heat[outside].mean()

    image = np.full((size, size, 3), 40, np.uint8)
    overlay = attention_overlay(image, attention)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    change = np.abs(overlay.astype(int) - image).sum(-1)
    changed_most = np.unravel_index(np.argmax(change), change.shape)
    assert row * 12 <= changed_most[0] < (row + 1) * 12
    assert col * 12 <= changed_most[1] < (col + 1) * 12
    # The corner farthest from the patch keeps the image's own pixels.
    far = (size - 1 if row < 2 else 0, size - 1 if col < 2 else 0)
    assert change[far] <= 3


def test_heatmap_edge_cases():
    flat = upsample_attention(np.full(16, 1 / 16), (20, 30))
    assert flat.shape == (20, 30) and not flat.any()  # uniform attention: nothing highlighted
    with pytest.raises(ValueError, match="square grid"):
        upsample_attention(np.ones(15), 10)


def test_word_diff_and_added_words():
    assert word_diff("", "a circle") == [("add", "a"), ("add", "circle")]
    assert word_diff("a red circle", "a small blue circle") == [
        ("same", "a"),
        ("drop", "red"),
        ("add", "small"),
        ("add", "blue"),
        ("same", "circle"),
    ]
    assert added_word_indices("a red circle", "a small blue circle") == [1, 2]
    assert added_word_indices("a circle", "a circle") == []
    html = diff_html("a red circle", "a blue <b>circle</b>")
    assert "<del>red</del>" in html and "<ins>blue</ins>" in html and "&lt;b&gt;" in html
    assert "(blank)" in diff_html("", "")


def test_added_words_attention_averages_their_tokens():
    attention = np.zeros((5, 4))
    attention[1, 0] = attention[2, 2] = 1.0
    # positions: word 0, word 1, word 1, word 2, pad
    got = added_words_attention(attention, [0, 1, 1, 2, -1], [1])
    np.testing.assert_allclose(got, [0.5, 0, 0.5, 0])
    assert added_words_attention(attention, [0, 1, 1, 2, -1], []) is None


def test_token_word_indices():
    tokenizer = train_tokenizer(
        ["a small red circle beside a large blue square"] * 20 + ["two circles", "one square"],
        vocab_size=300,
    )
    text = "a small red circle"
    tokens = tokenizer.encode(text) + [PAD_ID, PAD_ID]
    words = token_word_indices(tokenizer, tokens)
    assert words[-2:] == [-1, -1]
    assert sorted(set(words[:-2])) == [0, 1, 2, 3]
    assert words[:-2] == sorted(words[:-2])  # tokens run through the words in order


def test_last_layer_attention_shapes():
    scanned = {
        "detailer": {
            "layer_0": {"cross_attention": {"attention_weights": (jnp.zeros((3, 2, 2, 5, 4)),)}},
            "layer_1": {"cross_attention": {"attention_weights": (jnp.ones((3, 2, 2, 5, 4)),)}},
        }
    }
    assert float(last_layer_attention({"intermediates": scanned}).mean()) == 1.0
    unscanned = {
        "detailer": {
            "layer_0": {
                "cross_attention": {
                    "attention_weights": tuple(jnp.full((2, 2, 5, 4), k) for k in range(3))
                }
            }
        }
    }
    stacked = last_layer_attention(unscanned)
    assert stacked.shape == (3, 2, 2, 5, 4) and float(stacked[2].mean()) == 2.0
    with pytest.raises(ValueError, match="mutable"):
        last_layer_attention({})


@pytest.mark.parametrize(
    "variant,polish_steps,beam", [("tiny", 0, 1), ("tiny", 2, 1), ("tiny,autoregressive", 0, 3)]
)
def test_describe_with_attention_matches_decoding(variant, polish_steps, beam):
    config = load_config("shapes", variant)
    config.decode.polish_steps = polish_steps
    model = build_model(config, 60)
    params = jax.jit(lambda: train.init_variables(model, config, 60))()
    params = jax.tree.map(
        lambda x: x.unbox() if hasattr(x, "unbox") else x,
        params,
        is_leaf=lambda x: hasattr(x, "unbox"),
    )
    images = jax.random.uniform(jax.random.key(1), (2, 48, 48, 3), minval=-1, maxval=1)
    fractions = jnp.linspace(0.25, 1.0, 4)
    canvases, attention = jax.jit(describe_with_attention, static_argnums=(0, 4))(
        model, params, images, fractions, beam
    )
    num_steps = 4 if variant == "tiny" else 1
    assert canvases.shape == (2, num_steps, 16)
    assert attention.shape == (2, num_steps, 16, 16)  # [B, K, L, N]: 4 x 4 patches
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)  # softmax over patches
    method = "beam" if beam > 1 else "greedy"
    decoded = decode_batch(model, params, images, fractions, method=method, beam=beam)
    np.testing.assert_array_equal(canvases, decoded)
    if polish_steps:  # step K's attention is the last polish pass's, which wrote its canvas
        _, state = model.apply(
            {"params": params}, images, fractions, method="describe", mutable=["intermediates"]
        )
        applied = last_layer_attention(state["intermediates"]).mean(axis=2)  # [K + 2, B, L, N]
        assert applied.shape[0] == num_steps + polish_steps
        np.testing.assert_allclose(attention[:, -1], applied[-1], rtol=1e-6)
        np.testing.assert_allclose(attention[:, :-1], jnp.swapaxes(applied[:3], 0, 1), rtol=1e-6)


def synthetic_report(path: Path) -> None:
    """A report of two hand-made images with two heatmaps each."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
    attention = np.zeros(16)
    attention[5] = 1.0
    heat = attention_overlay(image, attention)
    items = [
        ReportImage(
            0,
            "img/1",
            ["a red circle"],
            ["circle", "red circle", "a red circle"],
            [0.5, 1.0, 2.0],
            image,
            [heat, heat, None],
            [["circle"], ["red"], []],
        ),
        ReportImage(
            1,
            "img 2",
            ["a <b> & c"],
            ["a", "b", ""],
            [1.0, 0.5, 0.0],
            image,
            [heat, heat, None],
            [["a"], ["b"], []],
        ),
    ]
    metrics = {
        "num_images": 2,
        "num_steps": 3,
        "cider_per_step": [0.75, 0.75, 1.0],
        "bleu4_per_step": [0.0, 0.1, 0.2],
        "final_cider": 1.0,
        "gradualness": 0.5,
        "progress_per_step": [0.2, 0.6, 1.0],
        "length_ratio_per_step": [0.3, 0.6, 1.0],
        "chain_agreement": [0.5, 0.5, 0.0],
    }
    write_report(
        path,
        metrics,
        items,
        [1 / 3, 2 / 3, 1.0],
        [1 / 6, 1 / 3, 1 / 2],
        worst=[1, 0],
        dropped=[1],
        info={"checkpoint": 7},
    )


def assert_offline(html: str) -> None:
    """No request can leave the page: no remote URL in src/href/url() and no script."""
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//|ftp:)""", html, re.I)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:|//)", html, re.I)
    assert "<script" not in html.lower()
    for src in re.findall(r"""src\s*=\s*["']([^"']*)""", html):
        assert src.startswith("data:image/png;base64,")


def test_select_images_bounds_and_orders():
    per_image = [
        {"cider": c, "monotonic": bool(np.all(np.diff(c) >= 0))}
        for c in ([0, 1, 2], [0, 2, 1], [1, 1, 1], [3, 0, 0], [0, 0, 0.5])
    ]
    shown, worst, dropped = select_images(per_image, 3)
    assert worst == [3, 4, 1, 2, 0]  # by final CIDEr, lowest first (ties by position)
    assert dropped == [3, 1]  # largest fall first
    assert len(shown) == 3 and 3 in shown
    assert shown == [i for i in worst if i in shown]
    assert select_images(per_image, 0)[0] == []
    assert sorted(select_images(per_image, 10)[0]) == [0, 1, 2, 3, 4]


def test_a_card_shows_its_own_image_when_ids_repeat_and_an_element_was_skipped(tmp_path):
    from refine_jax.data.shapes import ShapesSource
    from refine_jax.evaluation.attention import to_uint8
    from refine_jax.evaluation.captioning import describe_split
    from refine_jax.evaluation.evaluate import report_images

    shapes = ShapesSource("eval", 3)
    # Two photos under one id, after an element the eval pipeline leaves out.
    source = [
        {"key": "bad", "skip_reason": "corrupt_image"},
        {**shapes[1], "key": "same"},
        {**shapes[2], "key": "same"},
    ]
    config = load_config("shapes", "tiny")
    tokenizer = train_tokenizer([c for r in source[1:] for c in r["captions"]] * 20, 300)
    loaded = load_model(config, tmp_path, random_init=True, tokenizer=tokenizer)
    with loaded.context():
        args = (loaded.features, tokenizer, config.batch_size, loaded.fractions, loaded.put_batch)
        samples = describe_split(loaded.model, loaded.params, source, *args)
    per_image = [{"cider": [0.0] * len(s["steps"])} for s in samples]
    cards = report_images(loaded, source, samples, per_image, [0, 1])
    for card, element in zip(cards, source[1:], strict=True):
        np.testing.assert_array_equal(card.image, to_uint8(loaded.features.map(element)["image"]))


def test_cards_are_named_by_position_and_ranked_among_all_images():
    def card(index, image_id, final, cider):
        return ReportImage(index, image_id, ["a red circle"], ["circle", final], [0.1, cider])

    metrics = {"cider_per_step": [0.1, 0.5], "bleu4_per_step": [0.0, 0.1]}
    # Ids that repeat, or that differ only in characters an HTML id cannot hold.
    images = [
        card(0, "photo.1", "a red circle", 0.9),
        card(2, "photo_1", "a blue square", 0.2),
        card(3, "photo_1", "a green star", 0.1),
    ]
    worst = [3, 1, 2, 0]  # image 1 has no card
    page = render_report(metrics, images, [0.5, 1.0], [1 / 3, 2 / 3], worst=worst)
    assert re.findall(r"id='(img-[^']*)'", page) == ["img-0", "img-2", "img-3"]
    rows = re.findall(
        r"<tr><td>(\d+)</td><td><a href='#([^']*)'>([^<]*)</a></td><td>([\d.]+)", page
    )
    assert rows == [
        ("1", "img-3", "photo_1", "0.100"),
        ("3", "img-2", "photo_1", "0.200"),
        ("4", "img-0", "photo.1", "0.900"),
    ]


@needs_chromium
def test_synthetic_report_renders_in_chromium(tmp_path):
    path = tmp_path / "report.html"
    synthetic_report(path)
    html = path.read_text()
    assert_offline(html)
    expected = len(re.findall(r"<img\b", html))
    assert expected == 3 + 2 + 4  # plots, thumbnails, heatmaps
    outcome = check_in_browser(path)
    assert outcome["images"] == expected
    assert outcome["broken"] == 0, outcome
    assert outcome["problems"] == [] and outcome["console"] == [], outcome


@needs_chromium
def test_browser_check_catches_broken_images_and_errors(tmp_path):
    path = tmp_path / "bad.html"
    path.write_text(
        "<!DOCTYPE html><html><head></head><body><img src='data:image/png;base64,AA'>"
        "<script>notDefined();</script></body></html>"
    )
    outcome = check_in_browser(path)
    assert outcome["images"] == 1 and outcome["broken"] == 1
    assert any("notDefined" in p for p in outcome["problems"])
    # The command prints the same check as JSON and fails on it.
    command = [sys.executable, "-m", "refine_jax.commands.report_in_browser", f"--report={path}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert json.loads(result.stdout)["broken"] == 1


@needs_chromium
def test_eval_report_renders_and_screenshots(tmp_path_factory, tmp_path):
    workdir = trained_workdir(tmp_path_factory, "tiny")
    config = load_config("shapes", "tiny")
    config.data.eval_size = 6
    summary = evaluate_checkpoint(
        config,
        workdir,
        eval_name="report_test",
        loaded=load_model(config, workdir),
        max_report_images=4,
    )
    report = Path(summary["output_dir"]) / "report.html"
    html = report.read_text()
    assert_offline(html)
    assert html.count("<section class='card'") == 4
    outcome = check_in_browser(report)
    assert outcome["images"] == len(re.findall(r"<img\b", html)) >= 4 + 1
    assert outcome["broken"] == 0 and outcome["problems"] == [] and outcome["console"] == []

    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.evaluation.report",
            f"--report={report}",
            f"--screenshot={shot}",
            "--height=900",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 900)
        assert np.asarray(image.convert("L")).std() > 5  # not a blank page

"""Starting from a person's description: its words stay in place at every step and the
detailer writes the rest (`--mode=caption --start_from=...`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluate import trained_workdir

from refine_jax.evaluation.caption_images import caption_images
from refine_jax.model_loading import load_model
from refine_jax.models.refine import start_canvas
from refine_jax.special_tokens import BLANK_ID
from refine_jax.workdir_config import config_for_workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_workdir(tmp_path_factory, "tiny")


def test_start_canvas_puts_the_words_first_and_leaves_the_rest_blank():
    assert start_canvas([[7], [8, 9]], 5) == [7, 8, 9, BLANK_ID, BLANK_ID]
    with pytest.raises(ValueError, match="nothing is left to refine"):
        start_canvas([[7], [8, 9]], 3)


def test_every_step_keeps_the_given_words_where_they_were(workdir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    loaded = load_model(config_for_workdir(None, workdir), workdir)
    plain = caption_images(None, workdir, str(folder), tmp_path / "plain.jsonl", loaded=loaded)
    summary = caption_images(
        None, workdir, str(folder), tmp_path / "out.jsonl", loaded=loaded, start_from="a large red"
    )
    assert summary["start_from"] == "a large red" and summary["num_captioned"] == 3
    rows = [line for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and plain["num_captioned"] == 3
    import json

    for row in map(json.loads, rows):
        for text in row["steps"]:
            # (a barely trained model may glue word pieces onto "red", so compare the text)
            assert text.startswith("a large red"), row["steps"]


def test_an_empty_start_is_refused(workdir, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (20, 20)).save(folder / "x.png")
    with pytest.raises(ValueError, match="start_from is empty"):
        caption_images(None, workdir, str(folder), tmp_path / "o.jsonl", start_from="  ")

"""`--mode=caption` on a folder of user images: JPEG, PNG and WebP of odd sizes are described at
every step; a corrupt file is reported and skipped."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import load_config
from PIL import Image
from test_evaluate import run_main, trained_workdir

from refine_jax import decoding, model_kinds
from refine_jax.evaluation.caption_images import (
    caption_images,
    default_output,
    describe_images,
    list_images,
)
from refine_jax.evaluation.captioning import describe_split
from refine_jax.evaluation.evaluate import eval_split, load_model
from refine_jax.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_workdir(tmp_path_factory, "tiny")


def make_images(folder: Path) -> list[str]:
    """Good images of several formats and sizes, one corrupt file and one non-image; returns the
    good file names."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    good = {
        "wide.jpg": ((301, 97), "RGB", "JPEG"),
        "tall.PNG": ((23, 200), "RGBA", "PNG"),
        "grey.webp": ((64, 64), "L", "WEBP"),
        "small.jpeg": ((5, 7), "RGB", "JPEG"),
    }
    for name, ((width, height), mode, fmt) in good.items():
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 255, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        (folder / name).write_bytes(buffer.getvalue())
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(200)))
    (folder / "notes.txt").write_text("not an image")
    return sorted(good)


def test_caption_mode_describes_good_images_and_reports_the_bad_one(workdir, tmp_path):
    names = make_images(tmp_path / "photos")
    output = tmp_path / "out" / "captions.jsonl"
    result = run_main(
        "--config=configs/shapes.py:tiny",
        f"--workdir={workdir}",
        "--mode=caption",
        f"--images={tmp_path / 'photos'}",
        f"--output={output}",
    )
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(Path(r["file"]).name for r in rows) == names
    for row in rows:
        assert len(row["steps"]) == 4 and all(isinstance(s, str) for s in row["steps"])
    assert "corrupt.jpg" in result.stderr
    summary = json.loads(output.with_suffix(".summary.json").read_text())
    assert summary["num_captioned"] == 4 and summary["checkpoint_step"] == 20
    assert [Path(s["file"]).name for s in summary["skipped"]] == ["corrupt.jpg"]
    assert "step 4:" in result.stdout and "wide.jpg" in result.stdout


def test_caption_glob_default_output_and_batches(workdir, tmp_path):
    make_images(tmp_path / "photos")
    config = load_config("shapes", "tiny")
    config.batch_size = 8  # more images than one batch: two batches, the last padded
    loaded = load_model(config, workdir)
    for i in range(9):
        Image.new("RGB", (50 + i, 60), (i * 20, 0, 0)).save(tmp_path / "photos" / f"red{i}.png")
    out, err = io.StringIO(), io.StringIO()
    summary = caption_images(
        config, workdir, str(tmp_path / "photos" / "*.*"), loaded=loaded, stdout=out, stderr=err
    )
    assert summary["output"] == str(workdir / "captions" / "photos.jsonl")
    rows = [json.loads(line) for line in Path(summary["output"]).read_text().splitlines()]
    assert len(rows) == 13 and summary["num_captioned"] == 13  # a glob takes every file...
    skipped = sorted(Path(s["file"]).name for s in summary["skipped"])
    assert skipped == ["corrupt.jpg", "notes.txt"]  # ...and reports those it cannot read
    assert "notes.txt" in err.getvalue()
    # Same pixels, same description, whichever batch an image lands in.
    by_name = {Path(r["file"]).name: r["steps"] for r in rows}
    single = caption_images(
        config,
        workdir,
        str(tmp_path / "photos" / "red8.png"),
        output=tmp_path / "one.jsonl",
        loaded=loaded,
        stdout=out,
        stderr=err,
    )
    one = json.loads(Path(single["output"]).read_text())
    assert one["steps"] == by_name["red8.png"]


def test_list_images_and_default_output(tmp_path):
    make_images(tmp_path / "photos")
    listed = [p.name for p in list_images(tmp_path / "photos")]
    assert listed == sorted(["corrupt.jpg", "grey.webp", "small.jpeg", "tall.PNG", "wide.jpg"])
    with pytest.raises(FileNotFoundError, match="no files match"):
        list_images(str(tmp_path / "photos" / "*.gif"))
    with pytest.raises(FileNotFoundError, match="no such image"):
        list_images(tmp_path / "missing")
    assert default_output("/w", tmp_path / "photos") == Path("/w/captions/photos.jsonl")
    assert default_output("/w", tmp_path / "photos" / "a.jpg") == Path("/w/captions/photos.jsonl")


def test_a_folder_or_image_whose_name_holds_glob_characters_is_read_as_itself(tmp_path):
    make_images(tmp_path / "trip [2024]")
    listed = [p.name for p in list_images(tmp_path / "trip [2024]")]
    assert listed == sorted(["corrupt.jpg", "grey.webp", "small.jpeg", "tall.PNG", "wide.jpg"])
    (tmp_path / "trip [2024]" / "wide.jpg").rename(tmp_path / "trip [2024]" / "wide[1].jpg")
    one = tmp_path / "trip [2024]" / "wide[1].jpg"
    assert list_images(one) == [one]
    assert default_output("/w", one) == Path("/w/captions/trip [2024].jsonl")
    # A pattern is still a pattern where no file or folder has its name.
    assert len(list_images(str(tmp_path / "trip [[]2024]" / "*.jpg"))) == 2


@pytest.mark.parametrize(
    "variant,decoder,method",
    [("tiny", "refine_decode", "greedy"), ("tiny,autoregressive", "beam_decode", "beam")],
)
def test_a_folder_of_many_batches_compiles_the_decoder_once(
    tmp_path, monkeypatch, variant, decoder, method
):
    config = load_config("shapes", variant)
    config.batch_size = 16
    tokenizer = train_tokenizer(["a red circle above a blue square", "two green stars"] * 20, 300)
    loaded = load_model(config, tmp_path, random_init=True, tokenizer=tokenizer)
    traces = []
    traced = getattr(decoding, decoder)

    def counting(*args, **kwargs):  # runs once per trace of decode_batch, not per call
        traces.append(args[2].shape)
        return traced(*args, **kwargs)

    monkeypatch.setattr(decoding, decoder, counting)
    model_kinds.decode_batch.clear_cache()
    images = np.random.default_rng(0).uniform(-1, 1, (40, 48, 48, 3)).astype(np.float32)
    described = describe_images(loaded, images, method=method, beam=2)  # 3 batches, 1 padded
    assert traces == [(16, 48, 48, 3)] and model_kinds.decode_batch._cache_size() == 1
    # Another call, and single images (padded to the same batch), reuse that compilation and
    # describe each image as the batched call did.
    assert describe_images(loaded, images, method=method, beam=2) == described
    for i in (0, 17, 39):
        assert describe_images(loaded, images[i : i + 1], method=method, beam=2) == [described[i]]
    assert len(traces) == 1 and model_kinds.decode_batch._cache_size() == 1
    assert len(described) == 40 and all(
        len(steps) == (4 if method == "greedy" else 1) for steps in described
    )


def describe_loaded_split(loaded, source, **options) -> list[dict]:
    """describe_split of `source` with a loaded model, under its mesh, as eval mode runs it."""
    with loaded.context():
        return describe_split(
            loaded.model,
            loaded.params,
            source,
            loaded.features,
            loaded.tokenizer,
            loaded.config.batch_size,
            loaded.fractions,
            put_batch=loaded.put_batch,
            **options,
        )


@pytest.mark.parametrize("beam_size,decoder", [(1, "greedy_decode"), (3, "beam_decode")])
def test_eval_describes_the_split_with_the_configured_beam(
    tmp_path, monkeypatch, beam_size, decoder
):
    config = load_config("shapes", "tiny,autoregressive")
    config.data.eval_size = 20  # two batches of 16, the second padded
    config.decode.beam_size = beam_size
    tokenizer = train_tokenizer(["a red circle above a blue square", "two green stars"] * 20, 300)
    loaded = load_model(config, tmp_path, random_init=True, tokenizer=tokenizer)
    calls = []
    traced = getattr(decoding, decoder)

    def recording(model, params, images, *args, **kwargs):
        calls.append(args[:1])  # the beam size (beam search) or early_stop (greedy)
        return traced(model, params, images, *args, **kwargs)

    monkeypatch.setattr(decoding, decoder, recording)
    model_kinds.decode_batch.clear_cache()
    source, _ = eval_split(config)
    samples = describe_loaded_split(loaded, source, beam_size=config.decode.beam_size)
    assert len(samples) == 20 and all(len(s["steps"]) == 1 for s in samples)
    assert calls == [((3,) if beam_size > 1 else (True,))]  # traced once, two batches


def collapsed(text: str) -> str:
    """The text with each word that repeats the word before it left out."""
    words = text.split()
    return " ".join(w for i, w in enumerate(words) if i == 0 or w != words[i - 1])


def test_drop_repeats_leaves_out_repeated_words_in_eval_and_caption_mode(tmp_path):
    config = load_config("shapes", "tiny")
    config.data.eval_size = 16
    tokenizer = train_tokenizer(["a red circle above a blue square", "two green stars"] * 20, 300)
    loaded = load_model(config, tmp_path, random_init=True, tokenizer=tokenizer)
    # Every position's likeliest word is "a" (one piece), so each step writes it more than once.
    logits = loaded.params["detailer"]["logits"]
    logits["bias"] = logits["bias"].at[tokenizer.encode("a")[0]].add(20.0)
    source, _ = eval_split(config)

    def described(drop_repeats: bool) -> list[list[str]]:
        samples = describe_loaded_split(loaded, source, drop_repeats=drop_repeats)
        return [s["steps"] for s in samples]

    kept, dropped = described(False), described(True)
    assert any(collapsed(text) != text for steps in kept for text in steps)
    assert dropped == [[collapsed(text) for text in steps] for steps in kept]
    # What the model wrote stays on the samples it changed, for repetition as written.
    samples = describe_loaded_split(loaded, source, drop_repeats=True)
    assert [s.get("steps_as_written", s["steps"]) for s in samples] == kept
    for sample, as_written in zip(samples, kept, strict=True):
        assert ("steps_as_written" in sample) == (sample["steps"] != as_written)
    images = np.stack([loaded.features.map(source[i])["image"] for i in range(3)])
    config.decode.drop_repeats = True  # caption mode reads the loaded config
    assert describe_images(loaded, images) == dropped[:3]

"""`--mode=caption`: describe a user's images with a trained checkpoint, every step readable.

    python -m refine_jax.main --config=C --workdir=DIR --mode=caption \\
        --images=FOLDER_OR_GLOB_OR_FILE [--output=FILE.jsonl] [--checkpoint_step=N]

JPEG, PNG and WebP images of any size are resized and centre-cropped to the model's input
(`preprocess_image`). Files that cannot be decoded are reported on stderr, listed under `skipped`
in the summary, and left out. Writes one JSON line per image ({"file", "steps"}) to --output
(default DIR/captions/NAME.jsonl, NAME the images' folder name) and the summary beside it
(NAME.summary.json), and prints every step of every description.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
from etils import epath

from refine_jax.data.pipeline import preprocess_image
from refine_jax.data.records import CorruptImageError, decode_image
from refine_jax.evaluation.matching import MatchEmbedder, match_scores
from refine_jax.model_kinds import decode_batch
from refine_jax.model_loading import LoadedModel, load_model
from refine_jax.models.refine import start_canvas
from refine_jax.paths import folder_name, glob_paths, is_glob, is_uri
from refine_jax.sharding import to_host
from refine_jax.targets import caption_words
from refine_jax.workdir_config import config_for_workdir

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(spec: str | os.PathLike) -> list[epath.Path]:
    """The image files `spec` names (local or a URI): a folder (its *.jpg/.jpeg/.png/.webp
    files, any case, sorted), a glob (every matching file, sorted) or one file."""
    text = os.fspath(spec)
    text = text if is_uri(text) else os.path.expanduser(text)
    if is_glob(text):
        paths = [epath.Path(p) for p in glob_paths(text) if epath.Path(p).is_file()]
        if not paths:
            raise FileNotFoundError(f"no files match {text!r}")
        return paths
    path = epath.Path(text)
    if path.is_dir():
        paths = sorted(
            p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {path}")
        return paths
    if path.is_file():
        return [path]
    raise FileNotFoundError(f"no such image, folder or glob: {text!r}")


def read_image(path: epath.Path, size: int) -> np.ndarray:
    """The model input [size, size, 3] in [-1, 1] of an image file; CorruptImageError (or
    OSError) when it cannot be read."""
    return preprocess_image(decode_image(path.read_bytes()), size)


def default_output(workdir: str | epath.PathLike, spec: str | os.PathLike) -> epath.Path:
    """DIR/captions/NAME.jsonl, NAME the folder the images are in (or the folder given)."""
    return epath.Path(workdir) / "captions" / f"{folder_name(spec, 'images')}.jsonl"


def start_canvases(loaded: LoadedModel, text: str, batch_size: int) -> np.ndarray:
    """[batch_size, L] canvases of a description a person starts from (`start_canvas`)."""
    if loaded.config.model.kind != "refine":
        raise ValueError(
            f"--start_from needs a refinement model; this checkpoint is a "
            f"{loaded.config.model.kind!r} model"
        )
    words = caption_words(text)
    if not words:
        raise ValueError("--start_from is empty; give the words to start from")
    tokens = [loaded.tokenizer.encode(word) for word in words]
    canvas = start_canvas(tokens, loaded.config.model.canvas_length)
    return np.tile(np.asarray(canvas, np.int32), (batch_size, 1))


def describe_images(
    loaded: LoadedModel,
    images: np.ndarray,
    start_from: str | None = None,
    method: str = "greedy",
    beam: int = 1,
) -> list[list[str]]:
    """Every step's description of each image in `images` [n, S, S, 3], in batches of the
    config's batch size (the last one padded, so one compilation serves them all); with
    `start_from`, every image continues that description (its words stay) instead of blank.
    `method`/`beam`: the baseline's decoding (greedy, or beam search with `beam` > 1)."""
    batch_size = loaded.config.batch_size
    start = None
    if start_from:
        with loaded.context():  # placed once, shared by every batch
            start = loaded.put_batch({"start": start_canvases(loaded, start_from, batch_size)})
        start = start["start"]
    out: list[list[str]] = []
    for first in range(0, len(images), batch_size):
        chunk = images[first : first + batch_size]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), 0)])
        with loaded.context():
            canvases = decode_batch(
                loaded.model,
                loaded.params,
                loaded.put_batch({"image": padded})["image"],
                loaded.fractions,
                method,
                beam,
                start,
            )
        canvases = to_host(canvases)  # [B, K, L]
        if loaded.config.decode.drop_repeats:
            canvases = loaded.tokenizer.drop_repeated_words(canvases)
        out.extend([loaded.tokenizer.decode(c) for c in canvases[i]] for i in range(len(chunk)))
    return out


def caption_images(
    config: ml_collections.ConfigDict | None,
    workdir: str | epath.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike | None = None,
    checkpoint_step: int | None = None,
    loaded: LoadedModel | None = None,
    start_from: str | None = None,
    stdout: TextIO = sys.stdout,
    stderr: TextIO = sys.stderr,
    match_workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Captions the images `images` names; returns the summary {output, num_captioned,
    checkpoint_step, skipped: [{file, error}]} and writes the JSONL and summary files. `config`
    None: the one recorded in the workdir at training. `start_from`: a partial description
    every image continues from (step 0 written by a person). `match_workdir`: a matching
    model that scores every step against its image (`match_score_per_step` in each row; a step
    scoring below the one before is flagged where it is printed)."""
    paths = list_images(images)
    config = loaded.config if loaded and config is None else config_for_workdir(config, workdir)
    loaded = loaded or load_model(config, workdir, checkpoint_step)
    size = config.model.image_size
    good: list[epath.Path] = []
    arrays: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    for path in paths:
        try:
            arrays.append(read_image(path, size))
            good.append(path)
        except (CorruptImageError, OSError) as e:
            skipped.append({"file": str(path), "error": str(e)})
            print(f"skipping {path}: {e}", file=stderr)
    beam = config.decode.beam_size
    method = "beam" if beam > 1 else "greedy"
    descriptions = (
        describe_images(loaded, np.stack(arrays), start_from, method, beam) if arrays else []
    )
    scores = step_match_scores(match_workdir, good, descriptions) if match_workdir else None

    output = epath.Path(output) if output else default_output(workdir, images)
    summary = {
        "output": str(output),
        "num_captioned": len(good),
        "checkpoint_step": loaded.step,
        "start_from": start_from,
        "skipped": skipped,
    }
    if jax.process_index() != 0:
        return summary
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as f:
        for n, (path, steps) in enumerate(zip(good, descriptions, strict=True)):
            row = {"file": str(path), "steps": steps}
            if scores is not None:
                row["match_score_per_step"] = scores[n].tolist()
            f.write(json.dumps(row) + "\n")
    for n, (path, steps) in enumerate(zip(good, descriptions, strict=True)):
        print(str(path), file=stdout)
        for k, text in enumerate(steps):
            line = f"  step {k + 1}: {text}"
            if scores is not None:
                fell = k > 0 and scores[n, k] < scores[n, k - 1]
                line += f"   [match {scores[n, k]:.3f}{', fell' if fell else ''}]"
            print(line, file=stdout)
    output.with_suffix(".summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary), file=stdout)
    return summary


def step_match_scores(
    match_workdir: str | os.PathLike, paths: list[epath.Path], descriptions: list[list[str]]
) -> np.ndarray:
    """[N, K] reference-free image-text scores of every step's description (the matching model
    of `match_workdir`, reading each image at its own input size)."""
    matcher = load_model(None, match_workdir)
    if not paths:  # every image was skipped: nothing to score
        return np.zeros((0, 0), np.float32)
    embedder = MatchEmbedder.from_loaded(matcher)
    size = matcher.config.model.image_size
    num_steps = len(descriptions[0])
    with matcher.context():
        images = embedder.embed_images(np.stack([read_image(p, size) for p in paths]))
        flat = [text for steps in descriptions for text in steps]
        texts = embedder.embed_texts(flat).reshape(len(paths), num_steps, -1)
    return match_scores(images, texts)


__all__ = ["caption_images", "describe_images", "list_images", "read_image", "step_match_scores"]

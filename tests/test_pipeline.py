"""The input pipeline: epoch coverage, determinism, resume in a fresh process, multi-process
slices, exact bad-data counts (threads and worker processes), and the data configs' sources."""

from __future__ import annotations

import collections
import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, load_config
from PIL import Image

from refine_jax.data import make_sources, open_shards, training_captions
from refine_jax.data.pipeline import (
    SKIP_REASONS,
    CaptionFeatures,
    count_skips,
    eval_batches,
    local_batch_size,
    preprocess_image,
    structural_skip_counts,
    train_batches,
)
from refine_jax.data.shard_writer import ShardWriter
from refine_jax.data.shards import load_references
from refine_jax.special_tokens import BLANK_ID
from refine_jax.targets import coarse_to_fine
from refine_jax.tokenizer import Tokenizer, train_tokenizer

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
needs_flickr = pytest.mark.skipif(
    not (FLICKR / "val" / "00000.tar").exists(),
    reason=f"shared Flickr8k shards not found at {FLICKR} (shared data not checked out)",
)


# ---------------------------------------------------------------------------------------------
# Generated data


def jpeg(seed: int, size: tuple[int, int] = (24, 20)) -> bytes:
    """A small noise JPEG (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


WORDS = "a dog cat man woman runs sits on the grass red blue ball in park with near water".split()


def caption(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 8))))


def write_good_split(folder: Path, shards: int, per_shard: int, first: int = 0) -> list[str]:
    """``shards`` tar shards of good samples (2 captions each) with ShardWriter; their keys."""
    keys = []
    with ShardWriter(folder, per_shard) as writer:
        for i in range(first, first + shards * per_shard):
            key = f"s{i:05d}"
            writer.write(key, jpeg(i), [caption(2 * i), caption(2 * i + 1)], {"key": key})
            keys.append(key)
    return keys


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def members(key: str, captions: list[str], image: bytes | None = None) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "captions": captions}).encode()
    return [
        (f"{key}.jpg", image if image is not None else jpeg(len(key))),
        (f"{key}.txt", captions[0].encode()),
        (f"{key}.json", meta),
    ]


LONG_CAPTION = " ".join(WORDS[i % len(WORDS)] for i in range(300))


def write_bad_shards(root: Path) -> tuple[set[str], dict[str, int], dict[str, int]]:
    """Shards with every kind of bad sample. Returns (good keys, counts found in the batches,
    counts found while indexing)."""
    good = {f"good{i}" for i in range(6)}
    m: list[tuple[str, bytes]] = []
    for i in range(6):
        m += members(f"good{i}", [caption(100 + i), caption(200 + i)])
    m += members("long", [LONG_CAPTION])  # far longer than the canvas: cut, used and counted
    m += members("one_empty", ["first caption here", "", "third caption here"])  # part dropped
    good |= {"long", "one_empty"}
    m += members("corrupt", ["corrupt jpeg"], b"\xff\xd8\xff\xe0 not a jpeg at all")
    m += members("cut_jpeg", ["jpeg cut short"], jpeg(7)[:120])
    m += [("empty.jpg", jpeg(8)), ("empty.txt", b"")]
    m += [("blank.jpg", jpeg(9)), ("blank.txt", b"  \t\n ")]
    m += [("latin1.jpg", jpeg(10)), ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"))]
    m += [("no_image.txt", b"a caption without its image")]
    m += [("no_caption.jpg", jpeg(11))]
    write_tar(root / "00000.tar", m)
    # A shard cut in the middle of its last sample's image.
    path = write_tar(
        root / "00001.tar",
        members("t0", ["t zero"]) + members("t1", ["t one"]) + members("t2", ["t two"]),
    )
    with tarfile.open(path) as tar:
        cut = tar.getmember("t2.jpg").offset_data + 50
    with open(path, "r+b") as f:
        f.truncate(cut)
    good |= {"t0", "t1"}
    in_batches = {
        "corrupt_image": 2,
        "empty_caption": 1,
        "whitespace_caption": 1,
        "non_utf8_caption": 1,
        "truncated_caption": 1,
        "dropped/empty_caption": 1,
    }
    structural = {"missing_image": 1, "missing_caption": 1, "truncated_shard": 1}
    return good, in_batches, structural


def features_for(tokenizer: Tokenizer, random_crop: bool = False) -> CaptionFeatures:
    return CaptionFeatures(
        tokenizer,
        num_steps=3,
        canvas_length=16,
        image_size=16,
        random_crop=random_crop,
        crop_min_scale=0.7,
    )


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> tuple[Path, list[str], Path]:
    """48 good samples in 3 shards, and a tokenizer saved beside them."""
    root = tmp_path_factory.mktemp("good")
    keys = write_good_split(root / "train", shards=3, per_shard=16)
    tokenizer = train_tokenizer([caption(i) for i in range(200)] + [LONG_CAPTION], 400)
    tokenizer.save(root / "tokenizer")
    return root / "train", keys, root / "tokenizer"


@pytest.fixture(scope="module")
def flickr_val(tmp_path_factory):
    if not (FLICKR / "val" / "00000.tar").exists():
        pytest.skip(f"shared Flickr8k shards not found at {FLICKR}")
    source = open_shards(str(FLICKR / "val"), str(tmp_path_factory.mktemp("index")))
    tokenizer = train_tokenizer(training_captions(source), 500)
    features = CaptionFeatures(tokenizer, num_steps=4, canvas_length=24, image_size=16)
    return source, features


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def concat(batches: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------------------------
# Flickr8k val: every key once


@needs_flickr
def test_eval_path_yields_every_flickr_val_key_once_with_all_references(flickr_val):
    source, features = flickr_val
    references = load_references(FLICKR / "val")
    counts: collections.Counter = collections.Counter()
    keys, truncated_rows, rows = [], 0, 0
    for arrays, records in eval_batches(source, features, 64, skip_counts=counts):
        assert arrays["image"].shape == (64, 16, 16, 3) and arrays["targets"].shape == (64, 4, 24)
        assert int(arrays["mask"].sum()) == len(records)
        for record in records:
            keys.append(record["key"])
            assert record["captions"] == references[record["key"]]  # all 5, in order
            assert "image_bytes" not in record
        truncated_rows += int(arrays["truncated"].sum())
        rows += len(records)
    assert len(keys) == len(set(keys)) == rows == 1000
    assert set(keys) == set(references)
    # Nothing is bad in Flickr8k val; captions cut to the 24-token canvas are counted exactly.
    assert set(counts) <= {"truncated_caption"}
    assert counts["truncated_caption"] == truncated_rows
    assert structural_skip_counts(source) == {}


@needs_flickr
def test_training_path_covers_every_flickr_val_key_once_per_epoch(flickr_val):
    source, features = flickr_val
    batches = take(train_batches(source, features, 40, seed=3), 25)  # 25 x 40 = one epoch
    epoch = concat(batches)
    assert sorted(epoch["index"].tolist()) == list(range(1000))
    assert epoch["mask"].all()
    assert len({source.key(i) for i in epoch["index"]}) == 1000
    truncated_code = SKIP_REASONS.index("truncated_caption")
    assert (epoch["skip_reason"] == epoch["truncated"] * truncated_code).all()


# ---------------------------------------------------------------------------------------------
# Determinism, resume, processes


def test_same_seed_same_batches_other_seed_other_order(good_set):
    folder, _, tokenizer_dir = good_set
    source = open_shards(str(folder))
    features = features_for(Tokenizer.load(tokenizer_dir), random_crop=True)
    first = take(train_batches(source, features, 8, seed=0), 7)
    again = take(train_batches(source, features, 8, seed=0, num_threads=1), 7)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = take(train_batches(source, features, 8, seed=1), 7)
    order = concat(first)["index"]
    assert not np.array_equal(order, concat(other)["index"])
    # Each epoch (6 batches of 8) is a permutation; the next epoch is shuffled differently.
    assert sorted(order[:48].tolist()) == list(range(48))
    second = take(train_batches(source, features, 8, seed=0), 12)
    assert not np.array_equal(concat(second[:6])["index"], concat(second[6:])["index"])


RESUME_SCRIPT = """
import json, sys
import numpy as np
from refine_jax.data import open_shards
from refine_jax.data.pipeline import CaptionFeatures, train_batches
from refine_jax.tokenizer import Tokenizer

def main():
    folder, tokenizer_dir, state_file, out, n = sys.argv[1:6]
    features = CaptionFeatures(Tokenizer.load(tokenizer_dir), num_steps=3, canvas_length=16,
                               image_size=16, random_crop=True, crop_min_scale=0.7)
    iterator = train_batches(open_shards(folder), features, 8, seed=5)
    iterator.set_state(json.loads(open(state_file).read()))
    batches = [next(iterator) for _ in range(int(n))]
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})

if __name__ == "__main__":
    main()
"""


def test_restored_iterator_state_continues_exactly_in_a_fresh_process(good_set, tmp_path):
    folder, _, tokenizer_dir = good_set
    features = features_for(Tokenizer.load(tokenizer_dir), random_crop=True)
    iterator = train_batches(open_shards(str(folder)), features, 8, seed=5)
    take(iterator, 5)  # into the second epoch after the checkpoint below
    state = iterator.get_state()
    expected = take(iterator, 4)
    (tmp_path / "state.json").write_text(json.dumps(state))
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    result = subprocess.run(
        [
            sys.executable,
            str(script),
            str(folder),
            str(tokenizer_dir),
            str(tmp_path / "state.json"),
            str(tmp_path / "out.npz"),
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    restored = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(restored[f"{i}/{key}"], value, err_msg=f"{i}/{key}")


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_slices_that_assemble_the_global_batch(good_set, process_count):
    folder, _, tokenizer_dir = good_set
    source = open_shards(str(folder))
    features = features_for(Tokenizer.load(tokenizer_dir), random_crop=True)
    steps = 9  # 1.5 epochs of 6 global batches of 8
    single = take(train_batches(source, features, 8, seed=2), steps)
    local = [
        take(train_batches(source, features, 8, 2, 1, p, process_count), steps)
        for p in range(process_count)
    ]
    for step in range(steps):
        parts = [local[p][step] for p in range(process_count)]
        assert all(len(part["index"]) == 8 // process_count for part in parts)
        for key, value in single[step].items():
            np.testing.assert_array_equal(concat(parts)[key], value, err_msg=key)
    # Each process's slices of the first epoch (6 global batches): disjoint, covering all 48.
    seen = [concat(local[p][:6])["index"].tolist() for p in range(process_count)]
    assert sorted(sum(seen, [])) == list(range(48))


def test_batch_size_that_does_not_divide_over_processes_is_a_clear_error(good_set):
    with pytest.raises(ValueError, match="batch_size 10 does not divide over 4 processes"):
        local_batch_size(10, 4)
    with pytest.raises(ValueError, match="does not divide over the 8 batch shards"):
        local_batch_size(12, 2, batch_shards=8)
    assert local_batch_size(16, 2, batch_shards=8) == 8
    folder, _, tokenizer_dir = good_set
    features = features_for(Tokenizer.load(tokenizer_dir))
    with pytest.raises(ValueError, match="does not divide over 3 processes"):
        train_batches(open_shards(str(folder)), features, 8, 0, 1, 0, 3)


# ---------------------------------------------------------------------------------------------
# Bad data: read to the end, counted exactly


def test_bad_samples_never_crash_and_are_counted_exactly(tmp_path, good_set):
    good, in_batches, structural = write_bad_shards(tmp_path / "bad")
    source = open_shards(str(tmp_path / "bad"))
    assert len(source) == 15  # what indexing kept: 13 + 2 samples
    features = features_for(Tokenizer.load(good_set[2]))
    # Training path: one epoch in 3 batches of 5.
    epoch = concat(take(train_batches(source, features, 5, seed=0), 3))
    assert sorted(epoch["index"].tolist()) == list(range(15))
    delivered = [source.key(i) for i in epoch["index"][epoch["mask"]]]
    assert sorted(delivered) == sorted(good)  # every good sample, once
    assert count_skips(epoch) == in_batches
    assert structural_skip_counts(source) == structural
    long_row = [source.key(i) for i in epoch["index"]].index("long")
    assert epoch["mask"][long_row] and epoch["truncated"][long_row]
    assert (epoch["targets"][long_row, -1] != 0).sum() == 16  # the cut caption fills the canvas
    # Placeholders have the shapes of real examples and zero content.
    bad_rows = ~epoch["mask"]
    assert bad_rows.sum() == 5 and not epoch["image"][bad_rows].any()
    # Evaluation path: every good sample once, in order; the same counts.
    counts: collections.Counter = collections.Counter()
    keys = [
        r["key"]
        for _, records in eval_batches(source, features, 4, skip_counts=counts)
        for r in records
    ]
    assert keys == [source.key(i) for i in range(15) if source.key(i) in good]
    assert dict(counts) == in_batches


WORKERS_SCRIPT = """
import collections, json, sys
from absl import flags
from refine_jax.data import open_shards
from refine_jax.data.pipeline import CaptionFeatures, count_skips, train_batches
from refine_jax.tokenizer import Tokenizer

def main():
    flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags
    folder, tokenizer_dir = sys.argv[1:3]
    source = open_shards(folder)
    features = CaptionFeatures(Tokenizer.load(tokenizer_dir), num_steps=3, canvas_length=16,
                               image_size=16)
    iterator = train_batches(source, features, 5, 0, 1, num_workers=2)
    counts, indexes = collections.Counter(), []
    for _ in range(3):
        batch = next(iterator)
        counts.update(count_skips(batch))
        indexes += batch["index"].tolist()
    print(json.dumps({"counts": counts, "indexes": indexes}))

if __name__ == "__main__":
    main()
"""


def test_counts_are_exact_with_grain_worker_processes(tmp_path, good_set):
    good, in_batches, _ = write_bad_shards(tmp_path / "bad")
    script = tmp_path / "workers.py"
    script.write_text(textwrap.dedent(WORKERS_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "bad"), str(good_set[2])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["counts"] == in_batches
    threads = concat(
        take(
            train_batches(
                open_shards(str(tmp_path / "bad")), features_for(Tokenizer.load(good_set[2])), 5, 0
            ),
            3,
        )
    )
    assert out["indexes"] == threads["index"].tolist()  # the same order as with threads


# ---------------------------------------------------------------------------------------------
# Transforms


def test_crops_are_square_never_flipped_and_random_only_in_training():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8)
    normalised = image.astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(preprocess_image(image, 20), normalised[:, 5:25], atol=1e-6)
    windows = [normalised[:, left : left + 20] for left in range(11)]  # unflipped 20x20 crops
    lefts = set()
    for seed in range(8):
        crop = preprocess_image(image, 20, np.random.default_rng(seed))
        matches = [left for left, w in enumerate(windows) if np.allclose(crop, w, atol=1e-6)]
        assert len(matches) == 1  # a window of the image as it is, never a mirrored one
        lefts.add(matches[0])
    assert len(lefts) > 1  # the position is random
    scaled = preprocess_image(image, 8, np.random.default_rng(0), min_scale=0.5)
    assert scaled.shape == (8, 8, 3) and scaled.dtype == np.float32
    assert -1.0 <= scaled.min() and scaled.max() <= 1.0


def test_a_decoded_image_of_any_usual_layout_becomes_rgb_and_an_odd_one_is_counted():
    features = CaptionFeatures(train_tokenizer(["a grey dog"] * 20, 300), 2, 8, 4)
    grey = np.full((6, 5), 200, np.uint8)
    transparent = np.zeros((6, 5, 4), np.uint8)  # over white, as decoded files are
    for image in (grey, grey[..., None], np.repeat(grey[..., None], 3, -1)):
        example = features.map({"key": "k", "image": image, "captions": ["a grey dog"]})
        assert example["image"].shape == (4, 4, 3) and bool(example["mask"])
        np.testing.assert_allclose(example["image"], 200 / 127.5 - 1.0, atol=1e-6)
    example = features.map({"key": "k", "image": transparent, "captions": ["a grey dog"]})
    np.testing.assert_allclose(example["image"], 1.0)
    for odd in (np.zeros((6, 5, 2), np.uint8), np.zeros((6, 5, 3), np.float32)):
        example = features.map({"key": "k", "image": odd, "captions": ["a grey dog"]})
        assert not example["mask"]
        assert count_skips({k: example[k][None] for k in ("skip_reason", "dropped")}) == {
            "corrupt_image": 1
        }


def test_count_skips_names_reasons_and_maps_unknown_ones_to_other():
    features = CaptionFeatures(train_tokenizer(["a dog"] * 20, 300), 2, 8, 4)
    rows = [features.map({"key": "x", "skip_reason": r}) for r in ("corrupt_image", "weird")]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    assert count_skips(batch) == {"corrupt_image": 1, "other": 1}
    assert not batch["mask"].any() and batch["targets"].shape == (2, 2, 8)


# ---------------------------------------------------------------------------------------------
# Configs


@needs_flickr
def test_flickr8k_config_builds_its_sources(tmp_path):
    config = load_config("flickr8k", "tiny")
    config.data.path = str(FLICKR)
    config.data.index_cache_dir = str(tmp_path)
    train, held_out = make_sources(config)
    assert len(train) == 6000 and len(held_out) == config.data.max_eval_examples == 32
    assert held_out[0]["captions"] == load_references(FLICKR / "val")[held_out[0]["key"]]
    full = load_config("flickr8k")
    assert full.model.image_size % full.model.patch_size == 0
    assert 2000 <= full.tokenizer.vocab_size <= 4000 and 24 <= full.model.canvas_length <= 32


@pytest.mark.parametrize("name", ["flickr8k", "coco", "laion_coco_mix"])
def test_missing_data_path_is_a_clear_error(name, tmp_path):
    config = load_config(name, "tiny")
    with pytest.raises(ValueError, match=r"config\.data\.path is empty"):
        make_sources(config)
    config.data.path = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.data\.path = '.*nowhere' does not exist"):
        make_sources(config)


def test_shards_without_a_split_folder_name_it(tmp_path):
    write_good_split(tmp_path / "train", 1, 4)
    config = load_config("coco", "tiny")
    config.data.path = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no 'val' split folder"):
        make_sources(config)
    config.data.eval_path = str(tmp_path / "train" / "*.tar")  # an explicit glob instead
    train, held_out = make_sources(config)
    assert len(train) == len(held_out) == 4


def test_coco_config_reads_tar_and_array_record_shards(tmp_path):
    from refine_jax.data.array_record_convert import convert
    from refine_jax.data.array_records import ArrayRecordCaptionSource

    keys = write_good_split(tmp_path / "tar" / "train", 2, 6)
    write_good_split(tmp_path / "tar" / "val", 1, 5, first=100)
    config = load_config("coco", "tiny")
    config.data.path = str(tmp_path / "tar")
    train, held_out = make_sources(config)
    assert [train.key(i) for i in range(len(train))] == keys and len(held_out) == 5
    for split in ("train", "val"):
        convert(tmp_path / "tar" / split, tmp_path / "ar" / split)
    config.data.path = str(tmp_path / "ar")
    train, held_out = make_sources(config)
    assert isinstance(train, ArrayRecordCaptionSource) and len(train) == 12
    assert [train[i]["key"] for i in range(12)] == keys and len(held_out) == 5


def test_coco_tfds_variant_builds_its_sources(tmp_path):
    from test_coco import make_coco  # the generated raw COCO fixture of the converter tests

    from refine_jax.data import coco

    coco_dir, karpathy = make_coco(tmp_path / "raw")
    coco.prepare_tfds(coco_dir, tmp_path / "tfds", karpathy_json=karpathy)
    config = load_config("coco", "tiny,tfds")
    config.data.path = str(tmp_path / "tfds")
    train, held_out = make_sources(config)
    assert len(train) == 4 and len(held_out) == 2  # Karpathy train + restval; val
    assert {held_out[i]["key"] for i in range(2)} == {"73", "74"}


def test_labels_source_from_a_class_tree(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for label in ("golden_retriever", "tabby_cat"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}.jpg").write_bytes(jpeg(i))
    config = load_config("coco", "tiny")
    config.data.name = "labels"
    config.data.path = str(tmp_path)
    train, held_out = make_sources(config)
    assert len(train) == 6 and len(held_out) == 2
    assert "golden retriever" in train[0]["captions"][0]


@pytest.mark.parametrize("layout", ["aligned", "left"])
def test_canvas_targets_read_as_the_coarse_to_fine_descriptions(layout):
    caption_text = "a large red circle above a small blue square beside a green triangle"
    tokenizer = train_tokenizer([caption_text, "a small circle", "a red square"] * 20, 300)
    features = CaptionFeatures(tokenizer, 4, 40, 16, layout=layout)
    record = {"key": "x", "captions": [caption_text], "image": np.zeros((20, 20, 3), np.uint8)}
    example = features.map(record)
    assert not example["truncated"]
    texts = coarse_to_fine(caption_text, 4, tokenizer.salience)
    assert [tokenizer.decode(row) for row in example["targets"]] == texts
    full = example["caption"]
    for row in example["targets"]:
        if layout == "aligned":  # every token sits where it sits in the full caption
            assert np.all((row == full) | (row == BLANK_ID))
        else:  # written tokens first, then pad: no blanks
            assert BLANK_ID not in row

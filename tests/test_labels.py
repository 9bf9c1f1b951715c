"""Tests of labels-as-text sources on a generated class-folder tree and a tiny TFDS dataset."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from refine_jax.data import labels
from refine_jax.data.records import decode_image, is_record
from refine_jax.data.shards import NoSamplesError

TEMPLATES = ("a photo of a {label}", "a {label} in the wild", "{label}.")


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (8, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


# class folder -> image files (relative), label expected in captions
TREE = {
    "golden_retriever": ["a.jpg", "b.PNG", "sub/c.jpeg"],
    "tabby_cat": [f"img{i:02d}.jpg" for i in range(12)],
    "n01440764": ["fish.webp"],
}
LABELS = {
    "golden_retriever": "golden retriever",
    "tabby_cat": "tabby cat",
    "n01440764": "n01440764",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "classes"
    seed = 0
    for folder, files in TREE.items():
        for name in files:
            path = root / folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
            path.write_bytes(image_bytes(seed, fmt[name.rsplit(".", 1)[1].lower()]))
            seed += 1
    (root / "golden_retriever" / "notes.txt").write_text("not an image")
    (root / "empty_class").mkdir()
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(image_bytes(99))
    (root / "README.md").write_text("a file, not a class")
    return root


def expected_keys() -> dict[str, str]:
    """KEY -> class folder of every image of the tree."""
    return {
        f"{folder}/{name.rsplit('.', 1)[0]}": folder
        for folder, files in TREE.items()
        for name in files
    }


def test_all_templates_as_references(tree: Path) -> None:
    source = labels.FolderLabelSource(tree, TEMPLATES, mode="all")
    assert source.classes == ["empty_class", "golden_retriever", "n01440764", "tabby_cat"]
    assert len(source) == 16
    keys = expected_keys()
    seen = Counter()
    for i in range(len(source)):
        record = source[i]
        assert set(record) == {"key", "image_bytes", "captions"}
        seen[record["key"]] += 1
        label = LABELS[keys[record["key"]]]
        assert record["captions"] == [t.format(label=label) for t in TEMPLATES]
        assert decode_image(record["image_bytes"]).shape == (8, 10, 3)
        assert source.classes[source.label_index(i)] == keys[record["key"]]
    assert seen == Counter(list(keys))  # every image exactly once
    assert source[-1] == source[len(source) - 1]
    with pytest.raises(IndexError):
        source[len(source)]


def test_one_template_chosen_deterministically(tree: Path) -> None:
    a = labels.FolderLabelSource(tree, TEMPLATES, mode="one", seed=3)
    b = labels.FolderLabelSource(tree, TEMPLATES, mode="one", seed=3)
    c = labels.FolderLabelSource(tree, TEMPLATES, mode="one", seed=4)
    keys = expected_keys()
    used = Counter()
    for i in range(len(a)):
        record = a[i]
        (caption,) = record["captions"]
        label = LABELS[keys[record["key"]]]
        index = labels.template_index(record["key"], len(TEMPLATES), 3)
        assert caption == TEMPLATES[index].format(label=label)
        assert b[i] == record  # same on every instance, order of access irrelevant
        used[index] += 1
    assert len(used) == len(TEMPLATES)  # the choice spreads over the templates
    assert [a[i]["captions"] for i in range(len(a))] != [c[i]["captions"] for i in range(len(c))]
    # Default templates: "a photo of a {label}" among them.
    d = labels.FolderLabelSource(tree, mode="all")
    assert "a photo of a golden retriever" in d[0]["captions"]


def test_label_names_and_grain(tree: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench, Tinca tinca\n")
    names = {"empty_class": "nothing", "golden_retriever": "dog", "tabby_cat": "cat"}
    names["n01440764"] = labels.load_label_names(mapping)["n01440764"]
    source = labels.FolderLabelSource(tree, ["{label}"], mode="all", label_names=names)
    assert sorted({source[i]["captions"][0] for i in range(len(source))}) == ["cat", "dog", "tench"]
    plain = tmp_path / "names.txt"
    plain.write_text("nothing\ndog\nfish\ncat\n")
    source = labels.FolderLabelSource(tree, ["{label}"], mode="all", label_names=plain)
    assert source.labels == ["nothing", "dog", "fish", "cat"]
    with pytest.raises(ValueError, match="lacks"):
        labels.FolderLabelSource(tree, label_names={"tabby_cat": "cat"})

    dataset = grain.MapDataset.source(source).filter(is_record).shuffle(seed=0)
    assert sorted(r["key"] for r in dataset) == sorted(expected_keys())


def test_a_template_with_escaped_braces_is_refused_for_never_inserting_the_label() -> None:
    with pytest.raises(ValueError, match="never inserts the label"):
        labels.check_templates(("a photo of a {{label}}",))
    assert labels.check_templates(("{{a}} photo of a {label}",)) == ("{{a}} photo of a {label}",)


def test_a_tab_separated_label_file_maps_any_class_id(tmp_path: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("cat\tdomestic cat\nhot_dog\thot dog, frankfurter\n\n")
    assert labels.load_label_names(names) == {"cat": "domestic cat", "hot_dog": "hot dog"}
    assert labels.resolve_labels(["hot_dog", "cat"], names) == ["hot dog", "domestic cat"]
    names.write_text("n01440764\ttench, Tinca tinca\nn01443537 goldfish\n")
    assert labels.load_label_names(names) == {"n01440764": "tench", "n01443537": "goldfish"}


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("n01440764 tench, Tinca tinca\nn01443537\n", 2),  # a WordNet id without names
        ("n01440764 tench\n\ngoldfish\n", 3),
        ("cat\tdomestic cat\ndog\n", 2),  # a tab-separated mapping line without names
    ],
)
def test_a_label_file_mixing_line_shapes_is_an_error_naming_the_line(
    tmp_path: Path, text: str, line: int
) -> None:
    names = tmp_path / "names.txt"
    names.write_text(text)
    with pytest.raises(ValueError, match=f"names.txt:{line}: "):
        labels.load_label_names(names)


def test_bad_images_become_skip_markers(tree: Path) -> None:
    (tree / "tabby_cat" / "img00.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    source = labels.FolderLabelSource(tree, TEMPLATES)
    markers = [source[i] for i in range(len(source)) if not is_record(source[i])]
    assert markers == [{"key": "tabby_cat/img00", "skip_reason": "corrupt_image"}]
    unchecked = labels.FolderLabelSource(tree, TEMPLATES, verify_images=False)
    assert all(is_record(unchecked[i]) for i in range(len(unchecked)))


def test_errors(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no_tree"):
        labels.FolderLabelSource(tmp_path / "no_tree")
    (tmp_path / "flat").mkdir()
    with pytest.raises(NoSamplesError, match="flat"):
        labels.FolderLabelSource(tmp_path / "flat")
    (tmp_path / "flat" / "empty").mkdir()
    with pytest.raises(NoSamplesError, match="no images"):
        labels.FolderLabelSource(tmp_path / "flat")
    with pytest.raises(ValueError, match="label"):
        labels.FolderLabelSource(tree, ["a photo"])
    with pytest.raises(ValueError, match="cannot be filled"):
        labels.FolderLabelSource(tree, ["a {label} {other}"])
    with pytest.raises(ValueError, match="mode"):
        labels.FolderLabelSource(tree, mode="some")
    with pytest.raises(FileNotFoundError, match="missing_names.txt"):
        labels.FolderLabelSource(tree, label_names=tmp_path / "missing_names.txt")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        labels.TfdsLabelSource("imagenet2012", "validation", data_dir=tmp_path / "no_tfds")


# ---------------------------------------------------------------------------------------------
# TFDS classification datasets (a tiny stand-in for ImageNet, and ImageNet itself when prepared)


def _tiny_classification_builder():
    import tensorflow_datasets as tfds

    class RefineJaxTinyClassification(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Three images, ImageNet-like features: image, label (WordNet ids), file_name."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(encoding_format="jpeg"),
                        "label": tfds.features.ClassLabel(names=["n01440764", "n02085620"]),
                        "file_name": tfds.features.Text(),
                    }
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"validation": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                name = f"n0{i}_{i}.JPEG"
                yield name, {"image": image_bytes(i), "label": i % 2, "file_name": name}

    return RefineJaxTinyClassification


def test_tfds_label_source(tmp_path: Path) -> None:
    builder_cls = _tiny_classification_builder()
    builder = builder_cls(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    names = {"n01440764": "tench, Tinca tinca", "n02085620": "Chihuahua"}
    source = labels.TfdsLabelSource(
        builder, "validation", None, ["a photo of a {label}"], label_names=names
    )
    assert len(source) == 3 and source.class_names == ["n01440764", "n02085620"]
    records = [source[i] for i in range(3)]
    assert [r["key"] for r in records] == ["n00_0", "n01_1", "n02_2"]
    assert [r["captions"] for r in records] == [
        ["a photo of a tench"],
        ["a photo of a Chihuahua"],
        ["a photo of a tench"],
    ]
    assert records[1]["image_bytes"] == image_bytes(1)


def test_imagenet_when_prepared() -> None:
    tfds = pytest.importorskip("tensorflow_datasets")
    builder = tfds.builder("imagenet2012")
    if not builder.is_prepared():
        pytest.skip(f"imagenet2012 is not prepared in {builder.data_dir}")
    source = labels.imagenet_source("validation", templates=TEMPLATES, mode="all")
    assert len(source) == 50_000
    record = source[0]
    assert len(record["captions"]) == len(TEMPLATES)
    assert decode_image(record["image_bytes"]).ndim == 3

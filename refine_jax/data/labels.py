"""Labels as text: an image-classification dataset turned into image–caption records.

Each class label becomes a caption through templates such as ``"a photo of a {label}"``, so
classification data (ImageNet) can be mixed into caption training at a small rate. With
``mode="one"`` every example gets one template, chosen deterministically from its KEY and
``seed`` (the same on every run, worker and epoch); with ``mode="all"`` every template gives one
reference caption.

Sources (grain random-access: ``__len__``, ``__getitem__``) returning the package's records
``{"key", "image_bytes", "captions"}`` or skip markers (see :mod:`refine_jax.data.records`):

* :class:`FolderLabelSource`: a folder-per-class tree ``ROOT/<class>/<image>``; the label is the
  folder name with underscores as spaces (or looked up in ``label_names``); KEY is
  ``<class>/<file name without extension>``.
* :class:`TfdsLabelSource` / :func:`imagenet_source`: a prepared TFDS classification dataset,
  ``imagenet2012`` by default, read with ``tfds.data_source``-style access (no TensorFlow), label
  names from the builder info. ImageNet's names there are WordNet ids (``n01440764``); pass
  ``label_names`` (e.g. the ``LOC_synset_mapping.txt`` file: ``n01440764 tench, Tinca tinca``) to
  get words. TFDS is imported only when such a source is made.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, SupportsIndex

from absl import logging

from refine_jax.config import DEFAULT_TEMPLATES
from refine_jax.data.records import (
    CorruptImageError,
    Record,
    Skipped,
    SkipReason,
    check_caption,
    checked_index,
    decode_image,
    skipped,
)
from refine_jax.data.shards import NoSamplesError

MODES = ("one", "all")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_SYNSET = re.compile(r"n\d{8}")
_SYNSET_LINE = re.compile(r"n\d{8}[\t ]+\S.*")  # a WordNet id, then its names

LabelNames = Mapping[str, str] | Sequence[str] | str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Labels and templates


def label_from_name(name: str) -> str:
    """A readable label from a class name: underscores to spaces, first of comma synonyms.

    ``"golden_retriever"`` -> ``"golden retriever"``; ``"tench, Tinca tinca"`` -> ``"tench"``.
    """
    first = name.split(",")[0]
    return " ".join(first.replace("_", " ").split())


def load_label_names(path: str | os.PathLike) -> dict[str, str] | list[str]:
    """Reads a label-name file.

    Lines ``<class id><tab><names>``, or ``<WordNet id><space or tab><names>`` (such as
    ImageNet's ``LOC_synset_mapping.txt``), give a ``{class id: label}`` mapping; lines holding
    only a name give a list in class order. A file mixing the two shapes is an error naming the
    first line out of shape (a mapping line without names, say), not read as a list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label names file not found: {path!r}")
    with open(path, encoding="utf-8") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, 1) if line.strip()]
    if any(_SYNSET_LINE.fullmatch(line) for _, line in lines):
        pairs = [re.split(r"[\t ]+", line, maxsplit=1) for _, line in lines]
        pairs = [p if len(p) == 2 and _SYNSET.fullmatch(p[0]) else None for p in pairs]
        expected = "<WordNet id> <names>"
    elif any("\t" in line for _, line in lines):
        pairs = [line.split("\t", 1) if "\t" in line else None for _, line in lines]
        expected = "<class id><tab><names>"
    else:
        return [label_from_name(line) for _, line in lines]
    for (number, line), pair in zip(lines, pairs, strict=True):
        if pair is None:
            raise ValueError(
                f"{path}:{number}: {line!r} is not a {expected} line like the file's others"
            )
    return {key.strip(): label_from_name(names) for key, names in pairs}


def resolve_labels(class_names: Sequence[str], label_names: LabelNames | None) -> list[str]:
    """The caption label of each class: ``label_names`` applied to the dataset's class names."""
    if isinstance(label_names, str | os.PathLike):
        label_names = load_label_names(label_names)
    if label_names is None:
        return [label_from_name(n) for n in class_names]
    if isinstance(label_names, Mapping):
        missing = [n for n in class_names if n not in label_names]
        if missing:
            raise ValueError(f"label_names lacks {len(missing)} class(es), e.g. {missing[:3]}")
        return [label_from_name(label_names[n]) for n in class_names]
    names = list(label_names)
    if len(names) != len(class_names):
        raise ValueError(f"{len(names)} label names for {len(class_names)} classes")
    return [label_from_name(n) for n in names]


_LABEL_SENTINEL = "\x00label\x00"  # filled into templates to see that the label shows


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Returns the templates if each is a string that formats with ``label`` alone and puts
    the label in the caption."""
    if isinstance(templates, str):
        templates = (templates,)
    out = tuple(templates)
    if not out:
        raise ValueError("at least one caption template is needed")
    for template in out:
        if not isinstance(template, str) or "{label}" not in template:
            raise ValueError(f"caption template {template!r} must contain '{{label}}'")
        try:
            filled = template.format(label=_LABEL_SENTINEL)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"caption template {template!r} cannot be filled: {e!r}") from e
        if _LABEL_SENTINEL not in filled:  # "{{label}}" is an escaped, literal "{label}"
            raise ValueError(f"caption template {template!r} never inserts the label")
    return out


def template_index(key: str, num_templates: int, seed: int = 0) -> int:
    """The template chosen for KEY: a stable hash of (seed, KEY), not Python's salted ``hash``."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_templates


def label_captions(
    label: str, key: str, templates: Sequence[str], mode: str = "one", seed: int = 0
) -> list[str]:
    """The captions of one example: one template chosen by KEY, or every template."""
    if mode == "all":
        chosen = list(templates)
    elif mode == "one":
        chosen = [templates[template_index(key, len(templates), seed)]]
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    captions = []
    for template in chosen:
        text = check_caption(template.format(label=label))[0]
        if text is not None:
            captions.append(text)
    return captions


# ---------------------------------------------------------------------------------------------
# Sources


class _LabelSource:
    """Shared part of the sources: indexing, captions from labels, optional image check."""

    def __init__(
        self,
        labels: Sequence[str],
        templates: Sequence[str],
        mode: str,
        seed: int,
        verify_images: bool,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.labels = list(labels)
        self.templates = check_templates(templates)
        self.mode = mode
        self.seed = seed
        self.verify_images = verify_images

    def __len__(self) -> int:
        raise NotImplementedError

    def _example(self, i: int) -> tuple[str, int, bytes | None, str | None]:
        """(KEY, class index, image bytes or None, skip reason) of example ``i``."""
        raise NotImplementedError

    def label_index(self, index: SupportsIndex) -> int:
        """The class index of example ``index`` (reads the example)."""
        return self._example(self._check_index(index))[1]

    def _check_index(self, index: SupportsIndex) -> int:
        return checked_index(index, len(self))

    def __getitem__(self, index: SupportsIndex) -> Record | Skipped:
        key, label, image, reason = self._example(self._check_index(index))
        if reason is not None or image is None:
            return skipped(key, reason or SkipReason.MISSING_IMAGE)
        if self.verify_images:
            try:
                decode_image(image)
            except CorruptImageError:
                return skipped(key, SkipReason.CORRUPT_IMAGE)
        captions = label_captions(self.labels[label], key, self.templates, self.mode, self.seed)
        if not captions:
            return skipped(key, SkipReason.EMPTY_CAPTION)
        return {"key": key, "image_bytes": image, "captions": captions}


class FolderLabelSource(_LabelSource):
    """Records from a folder-per-class image tree ``root/<class>/**/<image>``.

    Classes are the sub-folders of ``root`` in sorted order; images (``.jpg``, ``.jpeg``,
    ``.png``, ``.webp``, any case) are found recursively, in sorted order. The label of a class
    is its folder name with underscores as spaces, unless ``label_names`` (a mapping from folder
    name, a list in class order, or a file; see :func:`load_label_names`) says otherwise.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        mode: str = "one",
        seed: int = 0,
        label_names: LabelNames | None = None,
        verify_images: bool = True,
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"class folder tree not found: {self.root!r}")
        self.classes = sorted(
            e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith(".")
        )
        if not self.classes:
            raise NoSamplesError(f"no class folders in {self.root!r}")
        super().__init__(
            resolve_labels(self.classes, label_names), templates, mode, seed, verify_images
        )
        self._files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = _image_files(os.path.join(self.root, name))
            if not files:
                logging.warning("Class folder %s holds no image", os.path.join(self.root, name))
            self._files.extend((f, label) for f in files)
        if not self._files:
            raise NoSamplesError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {self.root!r}")

    def __len__(self) -> int:
        return len(self._files)

    def key(self, index: SupportsIndex) -> str:
        """KEY of an example: ``<class folder>/<path in it without extension>``."""
        path, _ = self._files[self._check_index(index)]
        return os.path.splitext(os.path.relpath(path, self.root))[0].replace(os.sep, "/")

    def _example(self, i: int) -> tuple[str, int, bytes | None, str | None]:
        path, label = self._files[i]
        key = self.key(i)
        try:
            with open(path, "rb") as f:
                return key, label, f.read(), None
        except OSError as e:
            logging.warning("Cannot read %s: %s", path, e)
            return key, label, None, str(SkipReason.MISSING_IMAGE)

    def __repr__(self) -> str:
        return (
            f"FolderLabelSource({self.root!r}, {len(self.classes)} classes, {len(self)} images, "
            f"mode={self.mode!r}, {len(self.templates)} templates)"
        )


def _image_files(folder: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                out.append(os.path.join(dirpath, name))
    return out


class TfdsLabelSource(_LabelSource):
    """Records from a prepared TFDS image-classification dataset (ImageNet by default).

    Reads through ``builder.as_data_source`` with the image left encoded (no TensorFlow needed).
    Class names come from ``builder.info.features[label_key].names``, mapped through
    ``label_names`` when given. KEY is the example's ``key_field`` (ImageNet's ``file_name``)
    without extension, or ``<name>/<split>/<index>`` when the dataset has no such field.
    ``name`` is a registered TFDS name (``"imagenet2012"``, ``"name/config:version"``) or a
    ``tfds.core.DatasetBuilder`` already made. Raises FileNotFoundError when the dataset is not
    prepared in ``data_dir``.
    """

    def __init__(
        self,
        name: str | Any = "imagenet2012",
        split: str = "train",
        data_dir: str | os.PathLike | None = None,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        mode: str = "one",
        seed: int = 0,
        label_names: LabelNames | None = None,
        image_key: str = "image",
        label_key: str = "label",
        key_field: str | None = "file_name",
        verify_images: bool = False,
    ) -> None:
        import tensorflow_datasets as tfds  # lazily: only this source needs TFDS

        if isinstance(name, str):
            builder = tfds.builder(name, data_dir=os.fspath(data_dir) if data_dir else None)
        else:  # an already constructed builder
            builder = name
            name = builder.name
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not prepared in {os.fspath(builder.data_dir)!r}"
            )
        features = builder.info.features
        class_names = list(features[label_key].names)
        if label_names is None and class_names and all(_SYNSET.fullmatch(n) for n in class_names):
            logging.warning(
                "%s label names are WordNet ids (e.g. %s); pass label_names to caption with words",
                name,
                class_names[0],
            )
        super().__init__(
            resolve_labels(class_names, label_names), templates, mode, seed, verify_images
        )
        self.name, self.split = name, split
        self.class_names = class_names
        self._image_key, self._label_key = image_key, label_key
        self._key_field = key_field if key_field and key_field in features else None
        self._source = builder.as_data_source(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}
        )

    def __len__(self) -> int:
        return len(self._source)

    def _example(self, i: int) -> tuple[str, int, bytes | None, str | None]:
        example: dict[str, Any] = self._source[i]
        if self._key_field is not None:
            raw = example[self._key_field]
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            key = os.path.splitext(text)[0]
        else:
            key = f"{self.name}/{self.split}/{i}"
        image = example[self._image_key]
        return key, int(example[self._label_key]), bytes(image), None

    def __repr__(self) -> str:
        return (
            f"TfdsLabelSource({self.name!r}, split={self.split!r}, {len(self)} examples, "
            f"mode={self.mode!r}, {len(self.templates)} templates)"
        )


def imagenet_source(
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    label_names: LabelNames | None = None,
    **kwargs: Any,
) -> TfdsLabelSource:
    """ImageNet (TFDS ``imagenet2012``, prepared beforehand) as label-caption records."""
    return TfdsLabelSource("imagenet2012", split, data_dir, label_names=label_names, **kwargs)

"""Sentencepiece tokenizer trained on the caption corpus, saved with the salience statistics.

A tokenizer directory holds `spm.model` and `salience.json` (word frequencies used to order
coarse-to-fine targets). Special ids are fixed: pad 0, unk 1, bos 2, eos 3, and blank 4 (a
canvas position whose word a later refinement step has yet to write); the blank is a control
symbol, addressed by id only, so caption text reading "<blank>" is spelled like any other word.
Normalisation is the identity with byte fallback, so decode(encode(s)) == s exactly for any
text without U+2581 '▁' (sentencepiece's own space mark, read as a space; `normalize_caption`
maps it to one, so every normalised caption round-trips).

Command: python -m refine_jax.tokenizer --captions=shapes|SHARD_PATH --output_dir=DIR
(refine_jax/commands/train_tokenizer.py)
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

from refine_jax.special_tokens import (  # noqa: F401  (re-exported for existing importers)
    BLANK_ID,
    BLANK_PIECE,
    BOS_ID,
    EOS_ID,
    NOT_TEXT_IDS,
    PAD_ID,
    UNK_ID,
)
from refine_jax.targets import SalienceStats, normalize_caption

MODEL_FILE = "spm.model"
SALIENCE_FILE = "salience.json"
NUM_SPECIAL_IDS = len({PAD_ID, UNK_ID, BOS_ID, EOS_ID, BLANK_ID})  # the pieces before the bytes


class Tokenizer:
    """Text <-> ids with the project's fixed special ids, plus the caption salience stats."""

    def __init__(self, model_proto: bytes, salience: SalienceStats):
        self.model_proto, self._sp = _with_blank_as_control_symbol(model_proto)
        self.salience = salience
        for name, expected in (("pad", PAD_ID), ("unk", UNK_ID), ("bos", BOS_ID), ("eos", EOS_ID)):
            actual = getattr(self._sp, f"{name}_id")()
            if actual != expected:
                raise ValueError(f"tokenizer {name}_id is {actual}; refine_jax needs {expected}")
        if self._sp.piece_to_id(BLANK_PIECE) != BLANK_ID:
            raise ValueError(
                f"tokenizer has no {BLANK_PIECE} piece at id {BLANK_ID}; retrain it with "
                "python -m refine_jax.tokenizer"
            )
        # Pieces that open a word (sentencepiece marks them with a leading U+2581).
        self._word_starts = np.array(
            [self._sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)]
        )

    def __getstate__(self) -> dict:  # grain worker processes receive a pickled copy
        return {"model_proto": self.model_proto, "salience": self.salience}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_proto"], state["salience"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of an id sequence; pad, bos, eos and blank ids are dropped, as on the canvas."""
        return self._sp.decode([int(i) for i in ids if int(i) not in NOT_TEXT_IDS])

    def drop_repeated_words(self, canvases: np.ndarray) -> np.ndarray:
        """Canvases [..., L] with every word that repeats the word before it blanked, so
        "a dog is is running" reads "a dog is running" (the de-duplication of parallel
        decoders). Words are compared as text, whole (all their pieces; blanks between are
        skipped), as `str.split` reads the decoded description: "an angled" stays."""
        out = np.array(canvases, copy=True)
        rows = out.reshape(-1, out.shape[-1])  # [N, L], a view of out
        for row in rows:
            words: list[list[int]] = []  # each word's positions, in reading order
            for i, token in enumerate(row.tolist()):
                if token in NOT_TEXT_IDS:
                    continue
                if not words or self._word_starts[token]:
                    words.append([])
                words[-1].append(i)
            previous = None
            for word in words:
                text = self._sp.decode(row[word].tolist()).strip()
                if text and text == previous:
                    row[word] = BLANK_ID
                previous = text or previous
        return out

    def save(self, directory: str | epath.PathLike) -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Salience first, model last, each renamed into place: a directory with spm.model in
        # it is complete even while another process is reading it.
        for name, write in (
            (SALIENCE_FILE, self.salience.save),
            (MODEL_FILE, lambda p: epath.Path(p).write_bytes(self.model_proto)),
        ):
            partial = directory / f".{name}.partial"
            write(partial)
            partial.replace(directory / name)

    @classmethod
    def load(cls, directory: str | epath.PathLike) -> Tokenizer:
        directory = epath.Path(directory)
        if not (directory / MODEL_FILE).exists():
            raise FileNotFoundError(f"no tokenizer at {directory} (expected {MODEL_FILE})")
        return cls(
            (directory / MODEL_FILE).read_bytes(),
            SalienceStats.load(directory / SALIENCE_FILE),
        )


def train_tokenizer(
    captions: Sequence[str], vocab_size: int = 1000, model_type: str = "bpe"
) -> Tokenizer:
    """Trains a sentencepiece model and the salience statistics on `captions`, as the model
    sees them (`normalize_caption`: lower case, single spaces), so no piece is spent on case."""
    captions = [normalize_caption(c) for c in captions if c.strip()]
    if not captions:
        raise ValueError("cannot train a tokenizer on no captions")
    model = io.BytesIO()
    try:
        _train_sentencepiece(captions, vocab_size, model_type, model)
    except RuntimeError as error:  # sentencepiece's: "... required_chars. 270 vs 279"
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
        if needed is None:
            raise
        raise ValueError(
            f"vocab_size {vocab_size} is too small for these captions: sentencepiece needs at "
            f"least {needed.group(1)} (256 byte pieces, {NUM_SPECIAL_IDS} special ids and one "
            "piece per distinct character)"
        ) from error
    return Tokenizer(model.getvalue(), SalienceStats.from_captions(captions))


def _train_sentencepiece(
    captions: Sequence[str], vocab_size: int, model_type: str, model: io.BytesIO
) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        control_symbols=[BLANK_PIECE],  # never matched in text, unlike user_defined_symbols
        num_threads=1,
        minloglevel=2,
    )


def _with_blank_as_control_symbol(
    model_proto: bytes,
) -> tuple[bytes, spm.SentencePieceProcessor]:
    """The model with its blank piece a control symbol, every id unchanged, and its processor
    (the model is parsed once when it needs no change).

    Tokenizers trained before made it a user-defined symbol, which sentencepiece also matches
    in text: a caption reading "<blank>" encoded as BLANK_ID and lost the word. They load
    upgraded, so they encode such text as a fresh tokenizer does (spelled out)."""
    processor = spm.SentencePieceProcessor(model_proto=model_proto)
    if processor.piece_to_id(BLANK_PIECE) != BLANK_ID or processor.is_control(BLANK_ID):
        return model_proto, processor  # already a control symbol, or refused in Tokenizer
    from sentencepiece import sentencepiece_model_pb2  # protobuf: only old models need it

    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    model.pieces[BLANK_ID].type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
    upgraded = model.SerializeToString()
    return upgraded, spm.SentencePieceProcessor(model_proto=upgraded)


if __name__ == "__main__":  # the command lives in refine_jax/commands/train_tokenizer.py
    import runpy

    runpy.run_module("refine_jax.commands.train_tokenizer", run_name="__main__", alter_sys=True)

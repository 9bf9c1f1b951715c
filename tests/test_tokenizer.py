"""The sentencepiece tokenizer: fixed special ids, exact round trip, saved with salience stats."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from refine_jax.data import training_captions
from refine_jax.data.shapes import ShapesSource
from refine_jax.special_tokens import BLANK_PIECE
from refine_jax.targets import normalize_caption
from refine_jax.tokenizer import (
    BLANK_ID,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    train_tokenizer,
)


def flickr_captions(flickr8k_dir, split):
    references = json.loads((flickr8k_dir / split / "references.json").read_text())
    return [a["caption"] for a in references["annotations"]]


@pytest.fixture(scope="module")
def shapes_tokenizer():
    return train_tokenizer(training_captions(ShapesSource("train", 3000)), 400)


def test_round_trip_is_exact_on_shapes_captions(shapes_tokenizer):
    captions = training_captions(ShapesSource("eval", 2000))
    for caption in captions:
        assert shapes_tokenizer.decode(shapes_tokenizer.encode(caption)) == caption


def test_round_trip_is_exact_on_every_flickr8k_caption(flickr8k_dir):
    train = flickr_captions(flickr8k_dir, "train")
    val = flickr_captions(flickr8k_dir, "val")
    assert len(train) == 30000 and len(val) == 5000
    tokenizer = train_tokenizer(train, 2000)
    for caption in train + val:
        assert tokenizer.decode(tokenizer.encode(caption)) == caption


def test_round_trip_survives_unseen_characters_and_spacing(shapes_tokenizer):
    for text in ["  two  spaces ", "ünïcödé ☃ 猫", "tab\tand\nnewline", "A Dog."]:
        assert shapes_tokenizer.decode(shapes_tokenizer.encode(text)) == text


def test_special_ids_are_fixed_and_dropped_on_decode(shapes_tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID, BLANK_ID) == (0, 1, 2, 3, 4)
    ids = shapes_tokenizer.encode("a red circle")
    canvas = [BOS_ID, ids[0], BLANK_ID, BLANK_ID, *ids[1:], EOS_ID, PAD_ID, PAD_ID]
    assert shapes_tokenizer.decode(canvas) == "a red circle"
    assert min(ids) > BLANK_ID
    assert BLANK_ID not in shapes_tokenizer.encode("a blank circle")


def test_caption_text_reading_blank_is_spelled_out_not_encoded_as_the_blank(shapes_tokenizer):
    tok = shapes_tokenizer
    for text in ["a <blank> circle", "<blank>", normalize_caption("A <BLANK> Circle")]:
        ids = tok.encode(text)
        assert BLANK_ID not in ids, text
        assert tok.decode(ids) == text
    processor = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    pieces = [processor.id_to_piece(i) for i in range(6)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", BLANK_PIECE, "<0x00>"]
    assert processor.is_control(BLANK_ID)


def _old_tokenizer_model(captions: list[str]) -> bytes:
    """A model trained as tokenizers were before the blank became a control symbol."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions),
        model_writer=model,
        vocab_size=300,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=[BLANK_PIECE],
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def test_an_old_tokenizer_with_a_user_defined_blank_loads_with_its_ids_and_spells_blank_text(
    shapes_tokenizer, tmp_path
):
    captions = training_captions(ShapesSource("train", 300))
    old_model = _old_tokenizer_model(captions)
    old = spm.SentencePieceProcessor(model_proto=old_model)
    assert old.encode("a <blank> circle").count(BLANK_ID) == 1  # what the old model did
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "spm.model").write_bytes(old_model)
    shapes_tokenizer.salience.save(tmp_path / "old" / "salience.json")
    tok = Tokenizer.load(tmp_path / "old")
    loaded = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    assert [loaded.id_to_piece(i) for i in range(tok.vocab_size)] == [
        old.id_to_piece(i) for i in range(old.get_piece_size())
    ]
    for caption in captions[:200]:
        assert tok.encode(caption) == old.encode(caption)
    ids = tok.encode("a <blank> circle")
    assert BLANK_ID not in ids and tok.decode(ids) == "a <blank> circle"


def test_u2581_in_a_caption_is_a_space_so_normalised_captions_round_trip(shapes_tokenizer):
    for text in ["\u2581a circle", "a\u2581b", "a \u2581\u2581 red circle\u2581"]:
        caption = normalize_caption(text)
        assert "\u2581" not in caption
        assert shapes_tokenizer.decode(shapes_tokenizer.encode(caption)) == caption


def test_too_small_a_vocab_size_is_a_clear_error_giving_the_minimum():
    captions = ["a red circle above a blue square", "a small green triangle"] * 50
    # 256 byte pieces, 5 special ids, 18 characters: "abcdeghilmnoqrstuv" and the space.
    for vocab_size in (100, 278):
        with pytest.raises(ValueError, match="vocab_size .* at least 279"):
            train_tokenizer(captions, vocab_size)
    assert train_tokenizer(captions, 279).vocab_size >= 279


def test_command_refuses_too_small_a_vocab_size_with_the_minimum(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.tokenizer",
            "--captions=shapes",
            f"--output_dir={tmp_path / 'tok'}",
            "--vocab_size=100",
            "--max_captions=50",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "needs at least" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


def test_a_tokenizer_without_the_blank_piece_is_refused_with_how_to_fix_it(shapes_tokenizer):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["a red circle above a blue square"] * 50),
        model_writer=model,
        vocab_size=40,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        minloglevel=2,
    )
    with pytest.raises(ValueError, match="<blank>.*retrain"):
        Tokenizer(model.getvalue(), shapes_tokenizer.salience)


def test_save_and_load_keep_model_and_salience(shapes_tokenizer, tmp_path):
    shapes_tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.encode("a large red circle") == shapes_tokenizer.encode("a large red circle")
    assert loaded.salience.word_counts == shapes_tokenizer.salience.word_counts


def test_loading_a_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.load(tmp_path)


def test_training_on_no_captions_is_an_error():
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer(["", "  "])


def test_command_trains_and_saves_a_tokenizer(tmp_path):
    out = tmp_path / "tok"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "refine_jax.tokenizer",
            "--captions=shapes",
            f"--output_dir={out}",
            "--vocab_size=400",
            "--max_captions=500",
        ],
        check=True,
        capture_output=True,
    )
    tokenizer = Tokenizer.load(out)
    assert tokenizer.salience.num_captions == 500
    assert tokenizer.decode(tokenizer.encode("a small blue square")) == "a small blue square"


def test_pieces_are_learned_from_lower_cased_captions():
    captions = [f"A Dog Runs On The Grass number {i % 7} ." for i in range(200)]
    tokenizer = train_tokenizer(captions, vocab_size=320)
    import sentencepiece as spm

    processor = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
    pieces = [processor.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert not any(c.isupper() for piece in pieces for c in piece if not piece.startswith("<"))
    assert tokenizer.decode(tokenizer.encode("a dog runs")) == "a dog runs"
    assert (
        tokenizer.salience.word_counts["dog"] == 200 and "Dog" not in tokenizer.salience.word_counts
    )


def test_drop_repeated_words_blanks_a_word_that_repeats_the_one_before(shapes_tokenizer):
    tok = shapes_tokenizer

    def dropped(*parts: str | int) -> str:
        """Canvas of words and raw ids (blanks), then pad; the text after dropping repeats."""
        ids = [i for p in parts for i in (tok.encode(p) if isinstance(p, str) else [p])]
        canvas = np.asarray([ids + [PAD_ID] * 3])
        out = tok.drop_repeated_words(canvas)
        assert out.shape == canvas.shape and np.all(out[:, len(ids) :] == PAD_ID)
        return tok.decode(out[0])

    assert dropped("a small small circle") == "a small circle"
    assert dropped("a small", BLANK_ID, BLANK_ID, "small circle") == "a small circle"
    assert dropped("small small small") == "small"  # a run keeps its first word
    assert dropped("zebra zebra") == "zebra"  # six pieces each, dropped whole
    assert dropped("small smallz circle") == "small smallz circle"  # a prefix is another word
    assert dropped("a circle and a circle") == "a circle and a circle"  # not adjacent
    canvas = np.asarray(tok.encode("red red"))
    tok.drop_repeated_words(canvas)
    assert tok.decode(canvas) == "red red"  # the input is not changed

"""Trains the caption tokenizer (and its salience statistics) into a directory.

    python -m refine_jax.commands.train_tokenizer --captions=shapes|SHARD_PATH --output_dir=DIR

(`python -m refine_jax.tokenizer ...` runs this command too.)
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from refine_jax.data import training_captions
from refine_jax.data.shapes import ShapesSource
from refine_jax.data.shards import TarShardSource
from refine_jax.tokenizer import NUM_SPECIAL_IDS, train_tokenizer

flags.DEFINE_string("captions", None, "'shapes' or a shard folder/glob to read captions from.")
flags.DEFINE_string("output_dir", None, "Where to write spm.model and salience.json.")
flags.DEFINE_integer(
    "vocab_size",
    1000,
    f"Sentencepiece vocabulary size (an upper bound; at least {256 + NUM_SPECIAL_IDS}, the byte "
    "pieces and special ids, plus the number of distinct characters in the captions).",
)
flags.DEFINE_integer("max_captions", 20_000, "Read at most this many samples' captions.")
flags.mark_flags_as_required(["captions", "output_dir"])
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    del argv
    if FLAGS.captions == "shapes":
        source = ShapesSource("train", FLAGS.max_captions)
    else:
        source = TarShardSource(FLAGS.captions)
    captions = training_captions(source, FLAGS.max_captions)
    try:
        tokenizer = train_tokenizer(captions, FLAGS.vocab_size)
    except ValueError as err:  # too small a --vocab_size, or no captions: say so, no traceback
        raise app.UsageError(str(err)) from err
    tokenizer.save(FLAGS.output_dir)
    print(
        f"trained on {len(captions)} captions: {tokenizer.vocab_size} pieces -> {FLAGS.output_dir}"
    )


if __name__ == "__main__":
    app.run(main)

"""The fixed special token ids every tokenizer, model and data pipeline of the project agrees on.

pad 0, unk 1, bos 2, eos 3, and blank 4 (a canvas position whose word a later refinement step
has yet to write). A module of its own so models and the pipeline need not import the
sentencepiece tokenizer to know them.
"""

PAD_ID, UNK_ID, BOS_ID, EOS_ID, BLANK_ID = 0, 1, 2, 3, 4
BLANK_PIECE = "<blank>"
NOT_TEXT_IDS = (PAD_ID, BOS_ID, EOS_ID, BLANK_ID)  # dropped when a canvas is read as text

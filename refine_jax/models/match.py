"""The image–text matching model (DESIGN §11): the project's yardstick, never a captioner.

Two towers map an image and a description into one space of unit vectors: the ViT encoder,
mean-pooled and projected, and a small bidirectional text transformer over the tokenizer's
pieces, read at a leading BOS token and projected. A matching head (text layers that attend to
the image tokens, read at the BOS token) decides whether a description belongs to an image.

Training (`refine_jax.losses.contrastive_loss`, `match_head_loss`): a symmetric contrastive
loss over the whole global batch with a learned temperature, and the matching head on each pair,
one hard negative text per image and one hard negative image per text, drawn in proportion to
the exponentiated cosine similarities (`sample_hard_negatives`; at the learned temperature
the Flickr8k head collapsed, BENCHMARKS.md). Examples with the same caption (the whole
caption, whichever word subset each one reads) or the same image (a batch that spans an
epoch boundary, a small source in a mixture) are positives of each other, never negatives
(`match_positives`): on the shapes data many images share a caption.

The empty description (no token, only the BOS) has an embedding like any other: it is the
blank description c_0 of the gradualness metric (DESIGN §4).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from refine_jax.models.layers import (
    Dropout,
    Dtype,
    TextLayer,
    dense,
    layer_norm,
    learned_positions,
    token_embedding,
)
from refine_jax.models.vit import encoder_for
from refine_jax.special_tokens import BOS_ID, PAD_ID

MAX_LOGIT_SCALE = 100.0  # the learned inverse temperature is capped here, as CLIP does


def same_text(texts: jax.Array) -> jax.Array:
    """[B, L] token ids -> [B, B] bool: which examples have the same description."""
    return jnp.all(texts[:, None, :] == texts[None, :, :], axis=-1)


def same_image(index: jax.Array, source: jax.Array) -> jax.Array:
    """[B] index in its source, [B] source id -> [B, B] bool: which examples show the same
    image. An unknown index (negative, as untagged examples carry) matches only itself."""
    same = (index[:, None] == index[None, :]) & (source[:, None] == source[None, :])
    known = index >= 0
    return (same & known[:, None] & known[None, :]) | jnp.eye(index.shape[0], dtype=bool)


def match_positives(
    texts: jax.Array,  # [B, L]: what the text tower reads (a caption or a word subset of it)
    captions: jax.Array,  # [B, L]: the whole captions the texts were read from
    index: jax.Array,  # [B]: each example's index in its source
    source: jax.Array,  # [B]: each example's source id
) -> jax.Array:
    """[B, B] bool: pairs that belong together, never each other's negatives. The same whole
    caption counts, not only the same text read: an example read as a word subset of a caption
    another example reads whole still shares that caption; so does the same image twice."""
    return same_text(texts) | same_text(captions) | same_image(index, source)


def sample_hard_negatives(
    rng: jax.Array,
    similarity: jax.Array,  # [B, B]: row = the anchor, column = a candidate
    positives: jax.Array,  # [B, B] bool: candidates that belong to the anchor
    valid: jax.Array,  # [B] bool: real examples (padding is never drawn, nor an anchor)
) -> tuple[jax.Array, jax.Array]:
    """(index [B], found [B]): per anchor, a candidate drawn with probability proportional to
    exp(similarity) among the valid candidates that are not its positives. `found` is False for
    padding anchors and for anchors with no such candidate (their `index` is 0 and unused)."""
    allowed = ~positives & valid[None, :]
    logits = jnp.where(allowed, jax.lax.stop_gradient(similarity), -jnp.inf)
    found = valid & jnp.any(allowed, axis=-1)
    logits = jnp.where(found[:, None], logits, 0.0)  # rows with nothing to draw: any index
    index = jax.random.categorical(rng, logits, axis=-1)
    return jnp.where(found, index, 0), found


class MatchModel(nn.Module):
    """Image and text towers with a shared embedding space, and a matching head."""

    vocab_size: int
    canvas_length: int
    image_size: int
    patch_size: int
    width: int
    encoder_depth: int
    text_depth: int
    match_depth: int
    num_heads: int
    mlp_dim: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    dropout_rate: float = 0.0
    dropout_bits: int = 32  # random bits per dropout decision (layers.Dropout)
    remat: str = "none"
    position_bias: str = "none"  # of the encoder's self-attention (models.vit)
    unroll_scans: bool = False  # the encoder's layer scan as straight-line code
    freeze_encoder: bool = False  # a fixed, pretrained image encoder (models.vit)

    def setup(self):
        self.encoder = encoder_for(self)
        self.image_projection = dense(self.embed_dim, ("embed", "joint"), jnp.float32, "image_proj")
        self.dropout = Dropout(self.dropout_rate, self.dropout_bits)
        self.token_embedding = token_embedding(
            self.vocab_size, self.width, self.dtype, "token_embedding"
        )
        self.text_positions = learned_positions(  # [1, L+1, D]: the BOS, then the text
            self, "text_positions", self.canvas_length + 1, self.width, "length"
        )
        layer = lambda name: TextLayer(
            self.num_heads,
            self.mlp_dim,
            self.dtype,
            self.dropout_rate,
            dropout_bits=self.dropout_bits,
            name=name,
        )
        self.text_layers = [layer(f"text_layer_{i}") for i in range(self.text_depth)]
        self.text_norm = layer_norm(self.dtype, "text_norm")
        self.text_projection = dense(self.embed_dim, ("embed", "joint"), jnp.float32, "text_proj")
        self.match_layers = [layer(f"match_layer_{i}") for i in range(self.match_depth)]
        self.match_norm = layer_norm(self.dtype, "match_norm")
        self.match_head = dense(1, ("embed", "decision"), jnp.float32, "match_head")
        self.log_logit_scale = self.param(
            "log_logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ()
        )

    def encode_images(
        self, images: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Images [B, S, S, 3] -> (image tokens [B, N, D], unit embeddings [B, E])."""
        tokens = self.encoder(images, deterministic)
        pooled = jnp.mean(tokens, axis=1)  # [B, D]
        return tokens, _unit(self.image_projection(pooled))

    def encode_texts(
        self, texts: jax.Array, deterministic: bool = True
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token ids [B, L] (pad after the description; all pad: the empty description) ->
        (token states [B, L+1, D], key mask [B, L+1], unit embeddings [B, E])."""
        ids = jnp.concatenate([jnp.full((texts.shape[0], 1), BOS_ID, texts.dtype), texts], 1)
        key_mask = ids != PAD_ID  # [B, L+1]; the BOS is always attended to
        x = self.token_embedding(ids) + self.text_positions.astype(self.dtype)
        x = self.dropout(x, deterministic)
        for text_layer in self.text_layers:
            x = text_layer(x, None, deterministic, key_mask)
        x = self.text_norm(x)
        return x, key_mask, _unit(self.text_projection(x[:, 0]))

    def match_logits(
        self,
        text_states: jax.Array,  # [B, L+1, D]
        key_mask: jax.Array,  # [B, L+1]
        image_tokens: jax.Array,  # [B, N, D]
        deterministic: bool = True,
    ) -> jax.Array:
        """[B] logits that each description belongs to its image (the matching head)."""
        x = text_states
        for match_layer in self.match_layers:
            x = match_layer(x, image_tokens, deterministic, key_mask)
        return self.match_head(self.match_norm(x[:, 0]))[:, 0]

    def pair_logits(
        self,
        images: jax.Array,  # [B, S, S, 3]
        texts: jax.Array,  # [P, L]
        owner: jax.Array,  # [P]: the image (row of `images`) each text is paired with
    ) -> jax.Array:
        """[P] matching-head logits of each text with its image (scoring, filtering)."""
        image_tokens, _ = self.encode_images(images)
        text_states, key_mask, _ = self.encode_texts(texts)
        return self.match_logits(text_states, key_mask, image_tokens[owner])

    def logit_scale(self) -> jax.Array:
        """The learned inverse temperature, capped at MAX_LOGIT_SCALE. The cap passes the
        gradient straight through, so a scale pushed past it can still come back down (a plain
        minimum has zero gradient there and would hold it at the cap for good)."""
        log_scale = self.log_logit_scale
        capped = jnp.minimum(log_scale, jnp.log(MAX_LOGIT_SCALE))
        return jnp.exp(log_scale - jax.lax.stop_gradient(log_scale - capped))

    def __call__(
        self,
        images: jax.Array,  # [B, S, S, 3]
        texts: jax.Array,  # [B, L]
        valid: jax.Array,  # [B] bool
        negatives_rng: jax.Array,
        deterministic: bool = True,
        positives: jax.Array | None = None,  # [B, B] bool (`match_positives`); None: same text
    ) -> dict[str, jax.Array]:
        """Training pass: the scaled similarity matrix and the matching head's logits on
        3 x B pairs (each pair, a hard negative text per image, a hard negative image per
        text) with their labels and weights. Hard negatives are drawn in proportion to
        exp(cosine similarity)."""
        image_tokens, image_embedding = self.encode_images(images, deterministic)
        text_states, key_mask, text_embedding = self.encode_texts(texts, deterministic)
        similarity = image_embedding @ text_embedding.T  # [B, B] cosines: image, text
        logits = self.logit_scale() * similarity
        if positives is None:
            positives = same_text(texts)
        # Drawn from the cosines, not the scaled logits (BLIP's choice): at the learned
        # temperature the negatives were so hard that the Flickr8k head collapsed to its prior
        # (filter ROC AUC 0.54 against 0.79; BENCHMARKS.md).
        text_rng, image_rng = jax.random.split(negatives_rng)
        negative_text, has_text = sample_hard_negatives(text_rng, similarity, positives, valid)
        negative_image, has_image = sample_hard_negatives(image_rng, similarity.T, positives, valid)
        pair_states = jnp.concatenate([text_states, text_states[negative_text], text_states])
        pair_masks = jnp.concatenate([key_mask, key_mask[negative_text], key_mask])
        pair_images = jnp.concatenate([image_tokens, image_tokens, image_tokens[negative_image]])
        batch = texts.shape[0]
        return {
            "logits": logits,  # [B, B]
            "positives": positives,
            "match_logits": self.match_logits(
                pair_states, pair_masks, pair_images, deterministic
            ),  # [3B]
            "match_labels": jnp.concatenate([jnp.ones(batch), jnp.zeros(2 * batch)]),
            "match_weights": jnp.concatenate([valid, has_text, has_image]).astype(jnp.float32),
        }


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

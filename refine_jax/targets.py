"""Coarse-to-fine targets (DESIGN §3): nested sub-descriptions of a caption chosen by salience.

Step k of K targets about n·s(k) of the caption's n words. Words enter in a fixed priority
order, so every step's target contains the previous one (nesting), and the last step is
the whole caption. A caption's content words fall into phrases, each with one head word; the
priority order is:

1. the subject: the first phrase head that is noun-like, so step 1 names the main thing in
   the picture ("dog", not "jumping");
2. the other phrase heads, then their modifiers;
3. within each group, generic (frequent in the training captions) before rare, ties by position.

Whether a word is noun-like is read off the training captions, with no tagger: nouns end noun
phrases (they are followed by a function word or the caption's end) and often directly follow
a determiner ("a dog", "two dogs"); verbs rarely follow a determiner, and adjectives rarely end
a phrase. A run of consecutive content words ("dog jumping", "large red circle") is split after
its first noun-like word that the next word does not outdo: that word heads the words before
it, and the words after it form a phrase of their own.

After each content word enters, the function words it completes enter with it, in caption
order: a determiner with the phrase it opens, any other function word once the phrases (or the
caption boundary) on both of its sides have their heads kept, so "circle" grows into "a circle",
"a circle a square" and "a circle above a square" rather than "circle square".
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from etils import epath

from refine_jax.config import LAYOUTS, SCHEDULES, TARGET_KINDS

# Closed-class English words: articles, prepositions, conjunctions, pronouns, auxiliaries and
# punctuation. They carry little content on their own and join the content words around them.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every another its their his her our my your
    of in on at to from by for with without into onto over under above below behind near
    beside besides between among through across along around against toward towards up down
    out off about after before during while upon
    and or but nor so yet as than then
    it they them he she him we us you i who whom which what there here
    is are was were be been being am has have had do does did will would can could
    . , ; : ! ? ' " - ( ) 's
    """.split()
)

# Words that open a noun phrase: a word often right after one of these is noun-like.
DETERMINERS = frozenset(
    """
    a an the this that these those some any each every another its their his her our my your
    one two three four five six seven eight nine ten several many both few
    """.split()
)

# A word that ends a phrase in fewer than this share of its occurrences is a modifier.
_MODIFIER_ENDS = 0.25


def caption_words(caption: str) -> list[str]:
    """Lower-cased whitespace words: the unit in which targets are cut and lengths measured.
    U+2581 '▁' separates words too: it is the tokenizer's space mark and decodes as a space."""
    return caption.replace("\u2581", " ").lower().split()


def normalize_caption(caption: str) -> str:
    """The text the model is trained to write for a caption (lower case, single spaces, no
    U+2581), which the tokenizer round-trips exactly."""
    return " ".join(caption_words(caption))


def schedule_fractions(num_steps: int, schedule: str = "linear", log_a: float = 4.0) -> np.ndarray:
    """s(k) for k = 1..K: the fraction of the final description due after step k."""
    if num_steps < 1:
        raise ValueError(f"num_refine_steps must be >= 1, got {num_steps}")
    k = np.arange(1, num_steps + 1, dtype=np.float64)
    if schedule == "linear":
        return k / num_steps
    if schedule == "log":
        if log_a <= 0:
            raise ValueError(f"the log schedule needs log_a > 0, got {log_a}")
        return np.log1p(log_a * k) / np.log1p(log_a * num_steps)
    raise ValueError(f"unknown length schedule {schedule!r}; expected one of {SCHEDULES}")


def scheduled_word_counts(num_words: int, fractions: np.ndarray) -> list[int]:
    """Words kept at each step: round(n·s(k)), at least one word, never shrinking, n at the end."""
    counts, previous = [], 0
    for fraction in fractions:
        count = int(math.floor(num_words * float(fraction) + 0.5))
        count = min(num_words, max(count, previous, 1 if num_words else 0))
        counts.append(count)
        previous = count
    if num_words:
        counts[-1] = num_words
    return counts


@dataclass
class SalienceStats:
    """Word statistics of the training captions, saved next to the tokenizer: in how many
    captions each word appears (how generic it is) and, per occurrence, whether it directly
    follows a determiner or a modifier, and whether it ends a phrase (how noun-like it is)."""

    word_counts: dict[str, int] = field(default_factory=dict)
    num_captions: int = 0
    occurrences: dict[str, int] = field(default_factory=dict)
    after_determiner: dict[str, int] = field(default_factory=dict)
    ends_phrase: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> SalienceStats:
        captions = [caption_words(c) for c in captions]
        counts: collections.Counter[str] = collections.Counter()
        occurrences: collections.Counter[str] = collections.Counter()
        ends_phrase: collections.Counter[str] = collections.Counter()
        for words in captions:
            counts.update(set(words))
            occurrences.update(words)
            for i, word in enumerate(words):
                if i + 1 == len(words) or words[i + 1] in FUNCTION_WORDS:
                    ends_phrase[word] += 1
        # A modifier (adjective, numeral, first word of a compound) almost never ends a phrase.
        modifiers = {
            w
            for w, n in occurrences.items()
            if w not in FUNCTION_WORDS and ends_phrase[w] < _MODIFIER_ENDS * n
        }
        opened: collections.Counter[str] = collections.Counter()
        for words in captions:
            for i, word in enumerate(words):
                if i > 0 and (words[i - 1] in DETERMINERS or words[i - 1] in modifiers):
                    opened[word] += 1
        return cls(dict(counts), len(captions), dict(occurrences), dict(opened), dict(ends_phrase))

    def frequency(self, word: str) -> float:
        return self.word_counts.get(word, 0) / max(self.num_captions, 1)

    def nounness(self, word: str) -> float:
        """In [0, 1]: the share of the word's occurrences that follow a determiner or a modifier
        times the share that end a phrase; 0 for a word never seen. Nouns do both ("a black
        *dog* is"), adjectives rarely end a phrase, verbs rarely follow a determiner."""
        seen = self.occurrences.get(word, 0)
        if not seen:
            return 0.0
        opened = self.after_determiner.get(word, 0) / seen
        return opened * self.ends_phrase.get(word, 0) / seen

    def save(self, path: str | epath.PathLike) -> None:
        payload = {
            "num_captions": self.num_captions,
            "word_counts": self.word_counts,
            "occurrences": self.occurrences,
            "after_determiner": self.after_determiner,
            "ends_phrase": self.ends_phrase,
        }
        epath.Path(path).write_text(json.dumps(payload, sort_keys=True), encoding="utf-8")

    @classmethod
    def load(cls, path: str | epath.PathLike) -> SalienceStats:
        payload = json.loads(epath.Path(path).read_text(encoding="utf-8"))
        if "occurrences" not in payload:
            raise ValueError(
                f"{path} holds salience statistics of an older format (no noun statistics); "
                "retrain the tokenizer (python -m refine_jax.tokenizer) or start a new workdir"
            )
        return cls(
            payload["word_counts"],
            payload["num_captions"],
            payload["occurrences"],
            payload["after_determiner"],
            payload["ends_phrase"],
        )


# A noun-like word (nounness at least _NOUN_LIKE) this much more noun-like than the next word of
# its run ends a phrase there ("*dog* jumping"); otherwise the last word of the run is the head
# ("large red *circle*"). A subject is the first phrase head that is noun-like.
_NOUN_LIKE = 0.2
_HEAD_MARGIN = 0.1


def phrase_heads(words: Sequence[str], stats: SalienceStats) -> dict[int, int]:
    """For each content word position, the position of its phrase's head (see the module
    docstring): a run of content words is split after its first noun-like word."""
    head_of: dict[int, int] = {}
    i = 0
    while i < len(words):
        if words[i] in FUNCTION_WORDS:
            i += 1
            continue
        end = i
        while end + 1 < len(words) and words[end + 1] not in FUNCTION_WORDS:
            end += 1
        start = i
        while start <= end:  # split [start, end] after its first noun-like word, repeatedly
            head = end
            for j in range(start, end):
                noun = stats.nounness(words[j])
                if noun >= _NOUN_LIKE and noun > stats.nounness(words[j + 1]) + _HEAD_MARGIN:
                    head = j
                    break
            for j in range(start, head + 1):
                head_of[j] = head
            start = head + 1
        i = end + 1
    return head_of


def subject_position(words: Sequence[str], stats: SalienceStats) -> int | None:
    """The position of the caption's subject: the first phrase head that is noun-like, else
    the most noun-like head; None without content words."""
    heads = sorted(set(phrase_heads(words, stats).values()))
    if not heads:
        return None
    for head in heads:
        if stats.nounness(words[head]) >= _NOUN_LIKE:
            return head
    return max(heads, key=lambda h: (stats.nounness(words[h]), -h))


def salience_order(
    words: Sequence[str], stats: SalienceStats, subject_first: bool = True
) -> list[int]:
    """Word positions in the order they enter the description (see the module docstring);
    `subject_first` False drops rule 1 (the subject ranks as any other head)."""
    content = [i for i, w in enumerate(words) if w not in FUNCTION_WORDS]
    if not content:  # nothing but function words: keep them in caption order
        return list(range(len(words)))
    head_of = phrase_heads(words, stats)
    subject = subject_position(words, stats) if subject_first else None
    ranked = sorted(
        content, key=lambda i: (i != subject, head_of[i] != i, -stats.frequency(words[i]), i)
    )
    kept: set[int] = set()
    order: list[int] = []

    def joins_kept_phrases(j: int) -> bool:
        # A determiner enters with the phrase it opens ("a circle"); any other function word
        # once the phrases on both of its sides have their heads kept ("circle above square").
        left = [c for c in content if c < j]
        right = [c for c in content if c > j]
        right_kept = not right or head_of[right[0]] in kept
        if words[j] in DETERMINERS:
            return right_kept
        return (not left or head_of[left[-1]] in kept) and right_kept

    for i in ranked:
        kept.add(i)
        order.append(i)
        for j, word in enumerate(words):
            if j not in kept and word in FUNCTION_WORDS and joins_kept_phrases(j):
                kept.add(j)
                order.append(j)
    order.extend(j for j in range(len(words)) if j not in kept)
    return order


def step_word_indices(
    words: Sequence[str],
    num_steps: int,
    stats: SalienceStats,
    kind: str = "salience",
    schedule: str = "linear",
    log_a: float = 4.0,
) -> list[list[int]]:
    """For each step k, the caption positions of the words its target keeps, in caption order."""
    everything = list(range(len(words)))
    if kind == "full":
        return [everything] * num_steps
    if kind not in TARGET_KINDS:
        raise ValueError(f"unknown target kind {kind!r}; expected one of {TARGET_KINDS}")
    counts = scheduled_word_counts(len(words), schedule_fractions(num_steps, schedule, log_a))
    order = salience_order(words, stats, subject_first=kind == "salience")
    return [sorted(order[:count]) for count in counts]


def coarse_to_fine(
    caption: str,
    num_steps: int,
    stats: SalienceStats,
    kind: str = "salience",
    schedule: str = "linear",
    log_a: float = 4.0,
) -> list[str]:
    """The K target descriptions for one caption, coarse to fine; the last is the full caption."""
    words = caption_words(caption)
    steps = step_word_indices(words, num_steps, stats, kind, schedule, log_a)
    return [" ".join(words[i] for i in kept) for kept in steps]


def canvas_targets(
    word_tokens: Sequence[Sequence[int]],
    steps: Sequence[Sequence[int]],
    layout: str,
    blank_id: int,
) -> list[list[int]]:
    """Token ids of each step's target on the canvas (before padding).

    `word_tokens[i]` are the ids of caption word i and `steps[k]` the words step k keeps.
    Layout `left` writes the kept words one after another, so a word moves right whenever an
    earlier one is added. Layout `aligned` keeps every token at its position in the full
    caption and writes `blank_id` where a word is still to come: a step then fills blanks and
    copies the rest in place, and its text is the canvas with the blanks dropped.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown canvas layout {layout!r}; expected one of {LAYOUTS}")
    canvases = []
    for kept in steps:
        kept = set(kept)
        ids: list[int] = []
        for i, tokens in enumerate(word_tokens):
            if i in kept:
                ids.extend(tokens)
            elif layout == "aligned":
                ids.extend([blank_id] * len(tokens))
        canvases.append(ids)
    return canvases

"""Pronunciation: the words a recogniser heard, aligned with the words the learner was meant to say.

Both texts are normalised the same way: Unicode NFC, case folded, and everything but letters, marks and digits
dropped, so "Don't!" and "don\N{RIGHT SINGLE QUOTATION MARK}t" (typographic apostrophe) are the same word and
punctuation never counts.

Words are compared letter by letter, and for Korean jamo by jamo: each Hangul syllable splits into its initial
consonant, vowel and optional final consonant by the Unicode syllable arithmetic, so 안녕하새요 for 안녕하세요 is one
vowel of twelve letters off (ㅐ for ㅔ) rather than one syllable of five. A word's similarity to what was heard is
1 - (edit distance / length of the longer), 1 for an exact match.

The alignment is a word-level edit distance whose substitution costs 1 - similarity, so a misheard word pairs with
the word it resembles rather than whichever comes first; missing and inserted words cost 1. Recognisers also split
and merge words, Korean ones especially (사랑해요 heard as 사랑 해요): a target word may pair with two heard words,
or two target words with one, when the joined text matches closely.

A word's score is 100 * similarity, less up to a fifth when the recogniser was unsure of it (a word it barely made
out was probably not said clearly). The overall score is the mean word score over the target words, with each
inserted word counting half a missed one: singers add ad-libs, and fillers are part of speaking.
"""

from __future__ import annotations

import enum
import itertools
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

Floats: TypeAlias = NDArray[np.float64]

_HANGUL_FIRST = 0xAC00
_HANGUL_LAST = 0xD7A3
_MEDIALS = 21
_FINALS = 28  # including "no final consonant"
_INITIAL_JAMO = 0x1100
_MEDIAL_JAMO = 0x1161
_FINAL_JAMO = 0x11A7  # the final consonants start one after this; final index 0 means none

# A word the recogniser was certain of keeps its score; one it was not sure of at all loses a fifth.
_CONFIDENCE_WEIGHT = 0.2
# An inserted word costs half a missing one.
_INSERTION_WEIGHT = 0.5
# Words heard split (or merged) count as one only when the joined text is this similar to the target.
_MIN_JOIN_SIMILARITY = 0.8


class WordStatus(enum.Enum):
    CORRECT = "correct"
    SUBSTITUTED = "substituted"
    MISSING = "missing"
    INSERTED = "inserted"


@dataclass(frozen=True)
class RecognisedWord:
    """A word as a recogniser gives it: text, start and end in seconds, confidence 0 to 1."""

    text: str
    start: float
    end: float
    confidence: float = 1.0


@dataclass(frozen=True)
class WordResult:
    """One target word and what was heard for it, or one heard word that matches no target word (INSERTED).

    `expected` is the target word as written (without surrounding punctuation), "" when inserted; `heard` the
    recognised text, "" when missing; `start` and `end` are the heard word's (None when missing); `score` is 0-100
    (0 when missing or inserted); `jamo_accuracy` is the jamo similarity for a Korean target word, else None."""

    status: WordStatus
    expected: str
    heard: str
    score: float
    start: float | None
    end: float | None
    jamo_accuracy: float | None

    @property
    def correct(self) -> bool:
        return self.status is WordStatus.CORRECT


@dataclass(frozen=True)
class PronunciationResult:
    """Every target word and every inserted word, in the order spoken, and the overall score 0-100."""

    words: tuple[WordResult, ...]
    score: float

    @property
    def target_words(self) -> tuple[WordResult, ...]:
        """One result per target word, in order (the WordScore list)."""
        return tuple(word for word in self.words if word.status is not WordStatus.INSERTED)


def normalise(text: str) -> str:
    """The comparable form of a word: NFC, case folded, only letters, marks and digits."""
    folded = unicodedata.normalize("NFC", text).casefold()
    return "".join(character for character in folded if unicodedata.category(character)[0] in "LMN")


def decompose_hangul(text: str) -> str:
    """Hangul syllables split into conjoining jamo (initial, vowel, optional final); other characters kept."""
    letters: list[str] = []
    for character in text:
        code = ord(character)
        if not _HANGUL_FIRST <= code <= _HANGUL_LAST:
            letters.append(character)
            continue
        index = code - _HANGUL_FIRST
        initial, rest = divmod(index, _MEDIALS * _FINALS)
        medial, final = divmod(rest, _FINALS)
        letters.append(chr(_INITIAL_JAMO + initial) + chr(_MEDIAL_JAMO + medial))
        if final:
            letters.append(chr(_FINAL_JAMO + final))
    return "".join(letters)


def score_pronunciation(target_text: str, heard: Sequence[RecognisedWord]) -> PronunciationResult:
    """Aligns recognised words with the words of `target_text` and scores each target word."""
    targets = [(token, key) for token in target_text.split() if (key := normalise(token))]
    if not targets:
        raise ValueError("the target text has no words")
    spoken = [(word, key) for word in heard if (key := normalise(word.text))]
    target_keys = [key for _, key in targets]
    spoken_keys = [key for _, key in spoken]

    similarity = _similarities(target_keys, spoken_keys)
    spoken_pairs = _similarities(target_keys, _adjacent_joined(spoken_keys), _MIN_JOIN_SIMILARITY)
    target_pairs = _similarities(_adjacent_joined(target_keys), spoken_keys, _MIN_JOIN_SIMILARITY)
    steps = _align(similarity, spoken_pairs, target_pairs)

    words: list[WordResult] = []
    for step in steps:
        target_slice = [targets[i] for i in step.targets]
        spoken_slice = [spoken[j][0] for j in step.spoken]
        for token, key in target_slice:
            words.append(_word_result(token, key, spoken_slice, step.similarity))
        if not target_slice:
            words.append(_inserted(spoken_slice[0]))
    credit = sum(word.score for word in words)
    inserted = sum(1 for word in words if word.status is WordStatus.INSERTED)
    return PronunciationResult(words=tuple(words), score=credit / (len(targets) + _INSERTION_WEIGHT * inserted))


@dataclass(frozen=True)
class _Step:
    """One step of the alignment: target word indices and heard word indices it pairs (either may be empty)."""

    targets: tuple[int, ...]
    spoken: tuple[int, ...]
    similarity: float


def _align(similarity: Floats, spoken_pairs: Floats, target_pairs: Floats) -> list[_Step]:
    """The cheapest alignment, by dynamic programming over (target words, heard words) prefixes."""
    rows, columns = similarity.shape
    substitution = 1.0 - similarity
    # Joins cost their dissimilarity per target word, and are ruled out below the join threshold.
    spoken_join = np.where(spoken_pairs >= _MIN_JOIN_SIMILARITY, 1.0 - spoken_pairs, np.inf)
    target_join = np.where(target_pairs >= _MIN_JOIN_SIMILARITY, 2.0 * (1.0 - target_pairs), np.inf)

    cost = np.full((rows + 1, columns + 1), np.inf)
    cost[0] = np.arange(columns + 1)
    positions = np.arange(columns + 1, dtype=np.float64)
    for i in range(1, rows + 1):
        arriving = cost[i - 1] + 1.0  # target word i - 1 missing
        arriving[1:] = np.minimum(arriving[1:], cost[i - 1, :-1] + substitution[i - 1])
        if columns >= 2:
            arriving[2:] = np.minimum(arriving[2:], cost[i - 1, :-2] + spoken_join[i - 1])
        if i >= 2:
            arriving[1:] = np.minimum(arriving[1:], cost[i - 2, :-1] + target_join[i - 2])
        # Inserted heard words move along the row at 1 each: a running minimum does the whole row at once.
        cost[i] = positions + np.minimum.accumulate(arriving - positions)

    steps: list[_Step] = []
    i, j = rows, columns
    while i > 0 or j > 0:
        here = cost[i, j]
        if i > 0 and j > 0 and np.isclose(here, cost[i - 1, j - 1] + substitution[i - 1, j - 1]):
            steps.append(_Step((i - 1,), (j - 1,), float(similarity[i - 1, j - 1])))
            i, j = i - 1, j - 1
        elif i > 0 and j > 1 and np.isclose(here, cost[i - 1, j - 2] + spoken_join[i - 1, j - 2]):
            steps.append(_Step((i - 1,), (j - 2, j - 1), float(spoken_pairs[i - 1, j - 2])))
            i, j = i - 1, j - 2
        elif i > 1 and j > 0 and np.isclose(here, cost[i - 2, j - 1] + target_join[i - 2, j - 1]):
            steps.append(_Step((i - 2, i - 1), (j - 1,), float(target_pairs[i - 2, j - 1])))
            i, j = i - 2, j - 1
        elif i > 0 and np.isclose(here, cost[i - 1, j] + 1.0):
            steps.append(_Step((i - 1,), (), 0.0))
            i -= 1
        else:
            steps.append(_Step((), (j - 1,), 0.0))
            j -= 1
    return steps[::-1]


def _word_result(token: str, key: str, spoken: list[RecognisedWord], similarity: float) -> WordResult:
    is_korean = any(_HANGUL_FIRST <= ord(character) <= _HANGUL_LAST for character in key)
    expected = _strip_punctuation(token)
    if not spoken:
        return WordResult(WordStatus.MISSING, expected, "", 0.0, None, None, 0.0 if is_korean else None)
    confidence = min(word.confidence for word in spoken)
    clarity = 1.0 - _CONFIDENCE_WEIGHT * (1.0 - min(1.0, max(0.0, confidence)))
    return WordResult(
        status=WordStatus.CORRECT if similarity == 1.0 else WordStatus.SUBSTITUTED,
        expected=expected,
        heard=" ".join(_strip_punctuation(word.text) for word in spoken),
        score=100.0 * similarity * clarity,
        start=spoken[0].start,
        end=spoken[-1].end,
        jamo_accuracy=similarity if is_korean else None,
    )


def _inserted(word: RecognisedWord) -> WordResult:
    return WordResult(WordStatus.INSERTED, "", _strip_punctuation(word.text), 0.0, word.start, word.end, None)


def _strip_punctuation(text: str) -> str:
    """The text from its first letter, mark or digit to its last: "\"Hello," is "Hello", "don't" stays."""
    kept = [index for index, character in enumerate(text) if unicodedata.category(character)[0] in "LMN"]
    return text[kept[0] : kept[-1] + 1] if kept else ""


def _adjacent_joined(keys: list[str]) -> list[str]:
    return [first + second for first, second in itertools.pairwise(keys)]


def _similarities(first: list[str], second: list[str], minimum: float = 0.0) -> Floats:
    """1 - edit distance / longer length for every pair of words, on letters (jamo for Hangul). Pairs whose lengths
    alone rule out reaching `minimum` are left at 0 without being compared."""
    if not first or not second:
        return np.zeros((len(first), len(second)))
    # Lyrics repeat themselves (choruses): each distinct pair is compared once.
    first_distinct, first_index = np.unique(np.array(first), return_inverse=True)
    second_distinct, second_index = np.unique(np.array(second), return_inverse=True)
    first_codes, first_lengths = _encode([decompose_hangul(str(word)) for word in first_distinct])
    second_codes, second_lengths = _encode([decompose_hangul(str(word)) for word in second_distinct])
    longer = np.maximum(first_lengths[:, None], second_lengths[None, :])
    # The distance is at least the difference in length.
    rows, columns = np.nonzero(1.0 - np.abs(first_lengths[:, None] - second_lengths[None, :]) / longer >= minimum)
    distance = _edit_distances(first_codes[rows], first_lengths[rows], second_codes[columns], second_lengths[columns])
    similarity = np.zeros(longer.shape)
    similarity[rows, columns] = 1.0 - distance / longer[rows, columns]
    return similarity[np.ix_(first_index, second_index)]


def _encode(words: list[str]) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    lengths = np.array([len(word) for word in words], dtype=np.int32)
    codes = np.full((len(words), int(lengths.max())), -1, dtype=np.int32)
    for row, word in enumerate(words):
        codes[row, : len(word)] = [ord(character) for character in word]
    return codes, lengths


def _edit_distances(
    first: NDArray[np.int32],
    first_lengths: NDArray[np.int32],
    second: NDArray[np.int32],
    second_lengths: NDArray[np.int32],
) -> Floats:
    """Levenshtein distance of each pair (first[k], second[k]), vectorised over the pairs: row p of the usual table
    is computed for all pairs at once, and within a row insertions are a running minimum (as in services.kzone.dtw).
    """
    positions = np.arange(second.shape[1] + 1, dtype=np.int32)
    previous = np.broadcast_to(positions, (first.shape[0], positions.size)).copy()
    distance = np.zeros(first.shape[0])
    for p in range(1, first.shape[1] + 1):
        mismatch = (first[:, p - 1, None] != second).astype(np.int32)
        arriving = np.empty_like(previous)
        arriving[:, 0] = p
        arriving[:, 1:] = np.minimum(previous[:, 1:] + 1, previous[:, :-1] + mismatch)
        current = positions + np.minimum.accumulate(arriving - positions, axis=1)
        ending = first_lengths == p
        distance[ending] = current[ending, second_lengths[ending]]
        previous = current
    return distance

"""Pronunciation (services/kzone/pronunciation.py): recognised words aligned with a target text word by word, with
normalisation (case, punctuation, apostrophes, Unicode forms), per-word status and score, jamo-level partial credit
for Korean, Korean spacing differences forgiven, and an overall score: 100 for an exact match, less for each wrong,
missing or inserted word."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.kzone.pronunciation import (
    RecognisedWord,
    WordStatus,
    decompose_hangul,
    normalise,
    score_pronunciation,
)


def _heard(text: str, confidence: float = 1.0) -> list[RecognisedWord]:
    """Words as a recogniser gives them: one every half second, a leading space as Whisper writes them."""
    return [
        RecognisedWord(f" {word}", start=0.5 * index, end=0.5 * index + 0.4, confidence=confidence)
        for index, word in enumerate(text.split())
    ]


def _statuses(target: str, heard: str) -> list[tuple[WordStatus, str, str]]:
    return [(word.status, word.expected, word.heard) for word in score_pronunciation(target, _heard(heard)).words]


def test_an_exact_match_scores_100() -> None:
    result = score_pronunciation("Hello, how are you?", _heard("hello how are you"))
    assert result.score == 100.0
    assert all(word.correct and word.score == 100.0 for word in result.words)
    assert [word.expected for word in result.words] == ["Hello", "how", "are", "you"]
    assert [(word.start, word.end) for word in result.words][1] == (0.5, 0.9)


def test_one_wrong_word_is_substituted_with_partial_credit() -> None:
    result = score_pronunciation("I want to go home", _heard("I want to go hum"))
    home = result.words[-1]
    assert (home.status, home.expected, home.heard) == (WordStatus.SUBSTITUTED, "home", "hum")
    assert not home.correct
    assert home.score == pytest.approx(100 * (1 - 2 / 4))
    assert home.jamo_accuracy is None
    assert result.score == pytest.approx((4 * 100 + home.score) / 5)


def test_a_misheard_word_pairs_with_the_word_it_resembles() -> None:
    assert _statuses("the quick brown fox", "the brawn fox") == [
        (WordStatus.CORRECT, "the", "the"),
        (WordStatus.MISSING, "quick", ""),
        (WordStatus.SUBSTITUTED, "brown", "brawn"),
        (WordStatus.CORRECT, "fox", "fox"),
    ]


def test_missing_words_score_zero_and_have_no_timing() -> None:
    result = score_pronunciation("one two three four", _heard("one four"))
    assert [word.status for word in result.words] == [
        WordStatus.CORRECT,
        WordStatus.MISSING,
        WordStatus.MISSING,
        WordStatus.CORRECT,
    ]
    missing = result.words[1]
    assert (missing.heard, missing.score, missing.start, missing.end) == ("", 0.0, None, None)
    assert result.score == 50.0


def test_nothing_heard_scores_zero() -> None:
    result = score_pronunciation("I can't believe it", [])
    assert result.score == 0.0
    assert all(word.status is WordStatus.MISSING for word in result.words)


def test_inserted_words_are_listed_in_place_and_cost_half_a_missing_word() -> None:
    result = score_pronunciation("the cat sat", _heard("the cat yeah sat"))
    assert [(word.status, word.heard) for word in result.words] == [
        (WordStatus.CORRECT, "the"),
        (WordStatus.CORRECT, "cat"),
        (WordStatus.INSERTED, "yeah"),
        (WordStatus.CORRECT, "sat"),
    ]
    assert result.words[2].expected == ""
    assert result.score == pytest.approx(300 / 3.5)
    assert [word.expected for word in result.target_words] == ["the", "cat", "sat"]


@pytest.mark.parametrize(
    ("target", "heard"),
    [
        ("Don't stop believing!", "don't stop believing"),
        ("Don't stop believing!", "don\N{RIGHT SINGLE QUOTATION MARK}t stop believing"),
        ("Don't stop believing!", "Dont stop, believing."),
        ("It's a K-pop song...", "its a kpop song"),
        ("“Quoted” — words", "quoted words"),
    ],
)
def test_contractions_and_punctuation_do_not_count(target: str, heard: str) -> None:
    assert score_pronunciation(target, _heard(heard)).score == 100.0


def test_a_misheard_contraction_is_one_letter_off() -> None:
    result = score_pronunciation("I can't go", _heard("I cant go"))
    assert result.score == 100.0
    result = score_pronunciation("I can't go", _heard("I can go"))
    assert result.words[1].status is WordStatus.SUBSTITUTED
    assert result.words[1].score == pytest.approx(100 * 3 / 4)


def test_unicode_forms_and_case_are_one() -> None:
    composed = unicodedata.normalize("NFC", "Café 안녕")
    decomposed = unicodedata.normalize("NFD", "CAFÉ 안녕")
    assert normalise(composed) == normalise(decomposed) == "café안녕"
    assert score_pronunciation(composed, _heard(decomposed)).score == 100.0


def test_korean_gets_jamo_level_partial_credit() -> None:
    result = score_pronunciation("안녕하세요", _heard("안녕하새요"))
    word = result.words[0]
    assert word.status is WordStatus.SUBSTITUTED
    # Twelve jamo (ㅇㅏㄴ ㄴㅕㅇ ㅎㅏ ㅅㅔ ㅇㅛ), one vowel wrong (ㅐ for ㅔ).
    assert word.jamo_accuracy == pytest.approx(11 / 12)
    assert word.score == pytest.approx(100 * 11 / 12)
    assert result.score == pytest.approx(100 * 11 / 12)


def test_a_wrong_final_consonant_costs_one_jamo() -> None:
    word = score_pronunciation("감사합니다", _heard("감사함니다")).words[0]
    assert word.jamo_accuracy == pytest.approx(1 - 1 / 12)  # ㅁ for ㅂ: one final consonant of twelve jamo


def test_correct_korean_words_have_full_jamo_accuracy_and_missing_ones_none() -> None:
    result = score_pronunciation("사랑해요 정말", _heard("사랑해요"))
    assert result.words[0].jamo_accuracy == 1.0
    assert result.words[1].status is WordStatus.MISSING
    assert result.words[1].jamo_accuracy == 0.0


def test_korean_spacing_differences_are_forgiven() -> None:
    split = score_pronunciation("사랑해요 정말", _heard("사랑 해요 정말"))
    assert split.score == 100.0
    assert (split.words[0].heard, split.words[0].start, split.words[0].end) == ("사랑 해요", 0.0, 0.9)
    merged = score_pronunciation("안녕 하세요", _heard("안녕하세요"))
    assert merged.score == 100.0
    assert [word.heard for word in merged.words] == ["안녕하세요", "안녕하세요"]


def test_unrelated_words_heard_next_to_each_other_are_not_joined() -> None:
    assert _statuses("cat", "cap house") == [
        (WordStatus.SUBSTITUTED, "cat", "cap"),
        (WordStatus.INSERTED, "", "house"),
    ]


def test_low_confidence_costs_up_to_a_fifth() -> None:
    assert score_pronunciation("hello world", _heard("hello world", confidence=0.5)).score == pytest.approx(90.0)
    unsure = score_pronunciation("hello world", _heard("hello world", confidence=0.0))
    assert unsure.score == pytest.approx(80.0)
    assert all(word.correct for word in unsure.words)


def test_decomposition_matches_unicode_canonical_decomposition() -> None:
    for code in range(0xAC00, 0xD7A4):
        syllable = chr(code)
        assert decompose_hangul(syllable) == unicodedata.normalize("NFD", syllable)
    assert decompose_hangul("K-pop 노래!") == "K-pop " + unicodedata.normalize("NFD", "노래") + "!"


def test_a_target_without_words_is_an_error() -> None:
    with pytest.raises(ValueError, match="no words"):
        score_pronunciation(" ... !! ", _heard("hello"))


_WORDS = st.text(
    alphabet=st.sampled_from("abcdefgh가나다라안녕하세요'"),
    min_size=1,
    max_size=8,
).filter(lambda word: normalise(word) != "")


@given(st.lists(_WORDS, min_size=1, max_size=25))
def test_identical_texts_align_all_correct(words: list[str]) -> None:
    text = " ".join(words)
    result = score_pronunciation(text, _heard(text))
    assert result.score == 100.0
    assert len(result.words) == len(words)
    assert all(word.status is WordStatus.CORRECT for word in result.words)


@given(st.lists(_WORDS, min_size=1, max_size=15), st.lists(_WORDS, max_size=15))
def test_every_target_word_appears_once_in_order_and_every_heard_word_is_used(
    target: list[str], heard: list[str]
) -> None:
    result = score_pronunciation(" ".join(target), _heard(" ".join(heard)))
    assert [word.expected for word in result.target_words] == [word.strip("'") or word for word in target]
    assert 0.0 <= result.score <= 100.0
    # Each heard word is used once, in order: alone, joined with its neighbour for one target word, or for two
    # target words (which then share its timing).
    spans = list(dict.fromkeys((word.start, word.end) for word in result.words if word.heard))
    assert all(start is not None and end is not None for start, end in spans)
    used = [
        index for start, end in spans for index in range(round((start or 0) / 0.5), round(((end or 0) - 0.4) / 0.5) + 1)
    ]
    assert used == list(range(len(heard)))

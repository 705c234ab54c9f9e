"""Counting counterfactuals for CLIP ("Teaching CLIP to Count to Ten", Paiss et al. 2023).

The paper builds a *counting subset*: image-text pairs whose caption states exactly one
object count, in 2..10. For each such pair it writes a counterfactual caption in which that
number is swapped for another value in 2..10; the counterfactual is a hard negative for a
counting loss, and counting samples are mixed with ordinary ones so CLIP keeps its general
skills. This module finds counts in captions, writes counterfactuals and picks the indices
a dataset layer should draw; it is pure Python and never touches tensors.

What is a count (``find_counts``)
---------------------------------
A candidate is a number word "one".."twelve" (any case, whole words only, so "someone" and
"anyone" never match), a plain integer written in digits (1..999, no leading zero), or one of
the phrases "a pair of" (2) and "a dozen" (12), whose span covers the whole phrase. Values 1,
11, 12 and multiplied values are reported, although only 2..10 get counterfactuals, so that a
caption like "twelve eggs and two cups" is *not* mistaken for a single-count caption.
A number followed by "dozen", "hundred" or "thousand" is one count whose span covers both
words ("two dozen eggs" -> 24). Number words above twelve ("twenty") are not recognised.

A candidate is a count only if all of these hold; each rule is a cheap, documented heuristic
aimed at web captions, not a parser:

1. It stands alone: the character before it is the start, whitespace or an opening bracket or
   quote, and the character after it is whitespace. This rejects "$5", "#5", "5%", "2pm",
   "2nd", "10th", "iphone10", "one's" and hyphenated compounds ("two-story", "four-legged",
   "3-year-old"): a compound modifies one object rather than counting several.
2. Digits form a plain integer: "2.5", "10:30", "3-2", "2/3" and "1,000" are decimals, times,
   scores, ratios or large numbers. Runs of four or more digits are years or identifiers.
3. The previous word is not a name or model keyword ("iphone 10", "windows 10", "route 66",
   "number 7", "no. 5", "apollo 11", "2 x 4"), a month ("May 5") or a quantifier that makes the number
   a pronoun ("no one", "every one"); "one" after a determiner or adjective ("the one", "this
   one", "the little one") is a pronoun too.
4. The next word exists, starts with a letter, and is not a stopword, auxiliary or common verb
   ("one of the dogs", "two of them", "one another", "the red one is", "one and"), nor a unit,
   time, month or fraction word ("5 km", "10 kg", "3 years old", "2 inches", "5 minutes",
   "10 percent", "2 pm", "at 5 o'clock", "5 May", "two thirds"). Partitives ("two of the
   dogs") are rejected on purpose: they do not say how many objects the image shows.

"a couple of" is vague and never a count; ordinals ("first", "second") are not number words.

Mixing the data stream
----------------------
``split_counting`` divides a list of captions into counting and ordinary indices;
``mix_indices`` draws ``n`` indices of which a fraction ``ratio`` comes from the counting
subset (each subset is drawn in reshuffled passes, so nothing repeats before the whole subset
has been seen). A dataset layer builds each counting sample's hard negative with
``counterfactual(caption, rng)`` from a ``random.Random`` seeded by (seed, epoch, index), so
that the negatives are reproducible.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable

import numpy as np

NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}
WORD_OF = {value: word for word, value in NUMBER_WORDS.items()}
COUNTERFACTUAL_RANGE = range(2, 11)
PHRASES = {"a pair of": 2, "a dozen": 12}
MULTIPLIERS = {"dozen": 12, "hundred": 100, "thousand": 1000}

_WORD_RE = re.compile(r"\b(?:" + "|".join(NUMBER_WORDS) + r")\b", re.IGNORECASE)
_DIGITS_RE = re.compile(r"(?<!\d)\d+(?:[.,:/\-–]\d+)*")
_PHRASE_RE = re.compile(r"\ba\s+(?:pair\s+of|dozen)\b", re.IGNORECASE)
_OPENERS = "([{\"'“‘"
_PUNCTUATION = ".,;:!?\"'()[]{}“”‘’"


def _words(text: str) -> frozenset[str]:
    """The whitespace-separated words of ``text``: keeps the long word lists below compact."""
    return frozenset(text.split())


_MONTHS = _words(
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec"
)
# Words before a number that make it part of a name, model, identifier or dimension ("2 x 4").
_NAME_KEYWORDS = _words(
    "iphone ipad windows route number no nr apollo version v chapter page room gate platform "
    "channel model level episode season part step highway interstate bus flight track size "
    "jersey galaxy xbox playstation ps pixel series vol volume act figure fig table lane street "
    "avenue floor row seat grade class type mark mk war day year game round x"
)
# Quantifiers that turn a following number into a pronoun ("no one", "every one").
_QUANTIFIERS = _words("no any every each")
# Before "one" these make it a pronoun ("the one", "this one", "the little one").
_PRONOUN_ONE_PREV = _words("the this that which another other little big small only last same one")
# Words after a number that show it is not counting objects (prepositions, verbs, pronouns).
_STOP_NEXT = _words(
    "of another other others a an the this that these those it its they them their he she his "
    "her we you i my your our each all both some any and or but nor to in on at by for with "
    "without from into onto over under near next behind above below between beside besides "
    "across around through after before while when where as than then so if because out up "
    "down off apart together more less too also only just here there not instead is are was "
    "were be been being has have had do does did can could will would should may might must "
    "shall sit sits sat stand stands stood look looks seem seems appear appears go goes went "
    "get gets got make makes take takes see sees hold holds lie lies"
)
# Units of time, length, mass, volume, speed, money, data and fractions.
_UNITS = _words(
    "second seconds sec secs minute minutes min mins hour hours hr hrs day days week weeks month "
    "months year years yr yrs decade decades century centuries o'clock o’clock oclock am pm a.m "
    "p.m km m cm mm mi mile miles meter meters metre metres kilometer kilometers kilometre "
    "kilometres foot feet ft inch inches yard yards kg g gram grams kilogram kilograms lb lbs "
    "pound pounds ounce ounces oz liter liters litre litres l ml gallon gallons mph kph kmh "
    "percent per degree degrees dollars dollar cents euro euros bucks mb gb tb mp megapixel "
    "megapixels k x times half halves third thirds quarter quarters fifths"
)


def _clean(token: str) -> str:
    """A token without surrounding punctuation, lowercased."""
    return token.strip(_PUNCTUATION).lower()


def _prev_word(text: str, start: int) -> str:
    words = text[:start].split()
    return _clean(words[-1]) if words else ""


def _next_token(text: str, end: int) -> tuple[str, int]:
    """The whitespace-delimited token after ``end`` and the index where it ends ("" if none)."""
    rest = text[end:]
    stripped = rest.lstrip()
    if not stripped:
        return "", len(text)
    token = stripped.split(maxsplit=1)[0]
    token_start = end + len(rest) - len(stripped)
    return token, token_start + len(token)


def _stands_alone(text: str, start: int, end: int) -> bool:
    """Rule 1: no symbol, letter, digit or hyphen glued to either side of the candidate."""
    before_ok = start == 0 or text[start - 1].isspace() or text[start - 1] in _OPENERS
    return before_ok and end < len(text) and text[end].isspace()


def _next_word_ok(token: str) -> bool:
    """Rule 4: the next token is a word that can be the counted noun or its modifier."""
    if not token or not token[0].isalpha():
        return False
    word = _clean(token)
    return word not in _STOP_NEXT and word not in _UNITS and word not in _MONTHS and word.split("-")[0] not in _UNITS


def _prev_word_ok(prev: str, value: int, is_word: bool) -> bool:
    """Rule 3: the previous word does not make the number a name, date or pronoun."""
    if prev in _NAME_KEYWORDS or prev in _MONTHS or prev in _QUANTIFIERS:
        return False
    return not (is_word and value == 1 and prev in _PRONOUN_ONE_PREV)


def _digit_value(token: str) -> int | None:
    """Rule 2: the value of a plain integer 1..999 without a leading zero, else None."""
    if not token.isdigit() or len(token) > 3 or token.startswith("0"):
        return None
    return int(token)


def _candidates(caption: str) -> Iterable[tuple[int, int, int, str]]:
    """(start, end, value, kind) for every possible count, unfiltered; kind is word/digits/phrase."""
    for match in _PHRASE_RE.finditer(caption):
        yield match.start(), match.end(), PHRASES[" ".join(match.group().lower().split())], "phrase"
    for match in _WORD_RE.finditer(caption):
        yield match.start(), match.end(), NUMBER_WORDS[match.group().lower()], "word"
    for match in _DIGITS_RE.finditer(caption):
        value = _digit_value(match.group())
        if value is not None:
            yield match.start(), match.end(), value, "digits"


def _check(caption: str, start: int, end: int, value: int, kind: str) -> tuple[int, int, int] | None:
    """Apply rules 1, 3 and 4 to one candidate, extending "two dozen" over its multiplier."""
    if not _stands_alone(caption, start, end):
        return None
    if not _prev_word_ok(_prev_word(caption, start), value, kind == "word"):
        return None
    token, token_end = _next_token(caption, end)
    multiplier = MULTIPLIERS.get(_clean(token)) if kind != "phrase" else None
    if multiplier is not None:
        if not _stands_alone(caption, start, token_end):
            return None
        end, value = token_end, value * multiplier
        token, _ = _next_token(caption, end)
    return (start, end, value) if _next_word_ok(token) else None


def find_counts(caption: str) -> list[tuple[int, int, int]]:
    """Every count expression in ``caption`` as (start, end, value), ordered by start.

    ``caption[start:end]`` is the expression as written ("two", "10", "a pair of", "Two
    dozen"). Values may be 1 or above 10; see the module docstring for what counts.
    """
    found = (_check(caption, *candidate) for candidate in _candidates(caption))
    return sorted(span for span in found if span is not None)


def count_of(caption: str) -> int | None:
    """The caption's count if it has exactly one count and that count is in 2..10, else None."""
    counts = find_counts(caption)
    if len(counts) != 1 or counts[0][2] not in COUNTERFACTUAL_RANGE:
        return None
    return counts[0][2]


def is_counting_sample(caption: str) -> bool:
    """Whether the caption belongs to the counting subset (exactly one count, in 2..10)."""
    return count_of(caption) is not None


def _styled(value: int, original: str) -> str:
    """``value`` written like ``original``: digits stay digits, words keep their case."""
    if original.isdigit():
        return str(value)
    word = WORD_OF[value]
    if original.isupper():
        return word.upper()
    return word.capitalize() if original[0].isupper() else word


def _replace(caption: str, span: tuple[int, int, int], value: int) -> str:
    start, end, _ = span
    return caption[:start] + _styled(value, caption[start:end]) + caption[end:]


def _sample(rng, choices: list[int], n: int) -> list[int]:
    """``n`` distinct items of ``choices`` drawn with ``rng``: a random.Random, a numpy Generator or
    an int seed."""
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    if isinstance(rng, random.Random):
        return rng.sample(choices, n)
    if isinstance(rng, np.random.Generator):
        return [choices[int(i)] for i in rng.choice(len(choices), size=n, replace=False)]
    raise TypeError(f"rng must be a random.Random, a numpy.random.Generator or an int seed, got {type(rng).__name__}")


def counterfactuals(caption: str, rng, k: int) -> list[str]:
    """Up to ``k`` distinct counterfactual captions, in random order ([] if not a counting sample).

    Each replaces the caption's single count by a different value in 2..10, drawn without
    replacement with ``rng`` (a random.Random, a numpy Generator or an int seed). Counted nouns
    after 2..10 are plural, so agreement holds; "a pair of shoes" becomes e.g. "three shoes" (the
    noun after "a pair of" is plural already).
    """
    counts = find_counts(caption)
    if len(counts) != 1 or counts[0][2] not in COUNTERFACTUAL_RANGE:
        return []
    choices = [v for v in COUNTERFACTUAL_RANGE if v != counts[0][2]]
    return [_replace(caption, counts[0], v) for v in _sample(rng, choices, min(k, len(choices)))]


def counterfactual(caption: str, rng) -> str | None:
    """One counterfactual caption (value uniform over 2..10 minus the original), or None."""
    found = counterfactuals(caption, rng, 1)
    return found[0] if found else None


def split_counting(captions: Iterable[str]) -> tuple[list[int], list[int]]:
    """Indices of counting-subset captions and of all other captions, each in input order."""
    counting: list[int] = []
    ordinary: list[int] = []
    for index, caption in enumerate(captions):
        (counting if is_counting_sample(caption) else ordinary).append(index)
    return counting, ordinary


def _draw_passes(pool: list[int], m: int, rng: random.Random) -> list[int]:
    """``m`` items from ``pool`` in reshuffled passes: no repeat before the pool is exhausted."""
    out: list[int] = []
    while len(out) < m:
        order = list(pool)
        rng.shuffle(order)
        out.extend(order[: m - len(out)])
    return out


def mix_indices(counting: list[int], ordinary: list[int], ratio: float, n: int, rng: random.Random) -> list[int]:
    """``n`` indices, ``round(ratio * n)`` of them from ``counting``, the rest from ``ordinary``.

    The two kinds are interleaved at random. Deterministic for a given ``rng`` state.

    Raises:
        ValueError: ``ratio`` outside [0, 1], negative ``n``, or an empty subset that must
            supply at least one index.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    n_counting = round(ratio * n)
    for name, pool, m in (("counting", counting, n_counting), ("ordinary", ordinary, n - n_counting)):
        if m > 0 and not pool:
            raise ValueError(f"the {name} subset is empty but {m} of its indices were requested")
    mixed = _draw_passes(counting, n_counting, rng) + _draw_passes(ordinary, n - n_counting, rng)
    rng.shuffle(mixed)
    return mixed

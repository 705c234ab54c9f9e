"""Hard-negative captions by rules: NegCLIP / SugarCrepe replacements and swaps, ARO shuffles.

A caption is split into tokens (words, and punctuation marks on their own) that keep the
whitespace before them, so a negative is the caption with only the changed words different.
Words are recognised from the lexicon (:mod:`vlp.data.lexicon`), on lower-cased tokens:

    noun       a lexicon noun form ("dog", "dogs", "hot dog"), with its number; a noun right
               before another noun ("dog bed") is a modifier and is only ever shuffled
    adjective  a lexicon adjective before a noun (through other adjectives, "and", ",") or after
               "is"/"are"...; "orange", "square", "glass" are adjectives only before a noun
    relation   a spatial phrase ("on", "in front of"), or a verb taking an object ("holding a")

A multi-word lexicon noun ("fire hydrant", "tennis racket") is one noun, replaced and moved whole.
Names are left alone: in a caption that is not title-cased, a capitalised word inside a sentence
("Big Ben", "the Eiffel Tower", "an Apple laptop") is no slot, unless it opens a lexicon phrase
("Christmas tree"); so are the lexicon's fixed phrases ("little league") and a shade before a
colour ("light" in "light blue").

Replacements keep the number of the slot (a plural noun is replaced by a plural) and fix
"a"/"an" before a changed word. Every negative passes :func:`validate_negatives`.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache

from vlp.data import lexicon as lx

REPLACE_TYPES = ("replace_object", "replace_attribute", "replace_relation")
SWAP_TYPES = ("swap_objects", "swap_attributes")
SHUFFLE_TYPES = ("shuffle_nouns_adjectives", "shuffle_all_words", "shuffle_trigrams", "shuffle_within_trigrams")
TYPES = REPLACE_TYPES + SWAP_TYPES + SHUFFLE_TYPES

# Probability that a replacement comes from the replaced word's own category (dog -> cat rather
# than dog -> pizza), and that a relation is replaced by its opposite (on -> under).
SAME_CATEGORY_P = 0.6
OPPOSITE_RELATION_P = 0.7

_TOKEN = re.compile(r"(\s*)(\w+(?:['’-]\w+)*|[^\w\s])")
_MAX_PHRASE = 4  # longest lexicon entry, in tokens
_RELATIONS = {tuple(rel.split()): rel for rel in lx.RELATION_KIND}
_FIXED = dict.fromkeys(lx.FIXED_PHRASES, True)


def normalize(text: str) -> str:
    """The form in which two captions count as the same: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


def validate_negatives(
    candidates: Iterable[tuple[str, str]], caption: str, positives: Iterable[str] = (), k: int | None = None
) -> list[tuple[str, str]]:
    """The (text, type) candidates that are not empty, not the caption, not another positive
    caption of the image and not a repeat of an earlier candidate (all compared normalized),
    at most ``k`` of them; ``candidates`` is consumed lazily."""
    seen = {normalize(caption), *(normalize(p) for p in positives)}
    out: list[tuple[str, str]] = []
    for text, kind in candidates:
        if k is not None and len(out) >= k:
            break
        norm = normalize(text)
        if norm and norm not in seen:
            seen.add(norm)
            out.append((text, kind))
    return out


@dataclass(frozen=True)
class Slot:
    """A recognised word or phrase: tokens ``start:end`` of the caption."""

    kind: str  # "noun" | "adj" | "rel"
    start: int
    end: int
    lemma: str  # noun lemma, adjective, relation phrase (lower case)
    number: str = ""  # nouns: "sg" | "pl" | "mass"
    head: int = -1  # adjectives: first token of the noun described; -1 after "is" (predicative)
    modifier: bool = False  # nouns: describes the next noun ("dog bed")


@dataclass
class Caption:
    """A tokenized caption and its slots; ``tokens`` are (whitespace before, text) pairs."""

    tokens: list[tuple[str, str]]
    tail: str  # whitespace after the last token
    low: list[str]
    slots: list[Slot]
    names: frozenset[int] = frozenset()  # tokens that are (part of) a name: their case is not copied

    def of(self, kind: str) -> list[Slot]:
        return [s for s in self.slots if s.kind == kind]


def _is_word(token: str) -> bool:
    return token[:1].isalnum() or token[:1] == "_"


def _longest(low: list[str], i: int, table: dict) -> tuple[int, object]:
    """(length, value) of the longest ``table`` entry starting at token i, or (0, None)."""
    for n in range(min(_MAX_PHRASE, len(low) - i), 0, -1):
        hit = table.get(tuple(low[i : i + n]))
        if hit is not None:
            return n, hit
    return 0, None


def _noun_at(low: list[str], j: int) -> bool:
    return j < len(low) and _longest(low, j, lx.noun_forms())[1] is not None


def _content_at(low: list[str], j: int) -> bool:
    """An unknown word that is not a function word or relation: probably a noun we lack."""
    return j < len(low) and _is_word(low[j]) and low[j] not in lx.FUNCTION_WORDS and (low[j],) not in _RELATIONS


def _before_noun(low: list[str], j: int) -> bool:
    """Token j continues a noun phrase: a noun, an adjective or an unknown content word."""
    return _noun_at(low, j) or (j < len(low) and low[j] in lx.ADJECTIVE_CATEGORY) or _content_at(low, j)


def _adjective_at(low: list[str], j: int) -> bool:
    """A lexicon adjective used as one: before a noun phrase, if it can also be a noun."""
    if j >= len(low) or low[j] not in lx.ADJECTIVE_CATEGORY:
        return False
    n, form = _longest(low, j, lx.noun_forms())
    return form is None or (n == 1 and _before_noun(low, j + 1))


def _adjective_head(low: list[str], i: int) -> int | None:
    """First token of the noun the adjective at i describes, -1 when predicative, else None."""
    j = i + 1
    while j < len(low) and (_adjective_at(low, j) or low[j] in ("and", "or", ",")):
        j += 1
    if low[j - 1] not in ("and", "or", ",") and (_noun_at(low, j) or _content_at(low, j)):
        return j
    before = [t for t in low[max(0, i - 2) : i] if t not in ("very", "really", "quite")]
    return -1 if before and before[-1] in lx.COPULAS else None


def _relation_applies(low: list[str], j: int, rel: str) -> bool:
    """A relation needs an object after it; a verb needs it directly ("holding a cup", not
    "walking on the beach")."""
    if j >= len(low) or not _is_word(low[j]):
        return False
    return lx.RELATION_KIND[rel][0] == "spatial" or low[j] in lx.DETERMINERS or _before_noun(low, j)


def _noun_number(low: list[str], i: int, number: str) -> str:
    """The number of a noun whose two forms are one ("sheep"): that of its determiner."""
    if number != "any":
        return number
    j = i - 1
    while j >= 0 and low[j] in lx.ADJECTIVE_CATEGORY:
        j -= 1
    return "pl" if j >= 0 and low[j] in lx.PLURAL_DETERMINERS else "sg"


_SENTENCE_OPENERS = frozenset('.!?:;"“(')


def _names(texts: list[str], low: list[str]) -> frozenset[int]:
    """Tokens written as names: capitalised ("Ben", not "TV" or "A") and not opening a sentence,
    in a caption whose other content words are not all capitalised (title case says nothing)."""
    inner = [
        i
        for i, t in enumerate(texts)
        if t[:1].isalpha() and i > 0 and low[i - 1] not in _SENTENCE_OPENERS and low[i] not in lx.FUNCTION_WORDS
    ]
    if not any(texts[i][:1].islower() for i in inner):
        return frozenset()
    return frozenset(i for i in inner if texts[i][:1].isupper() and any(c.islower() for c in texts[i][1:]))


def parse(caption: str) -> Caption:
    """Tokenize ``caption`` and find its nouns, adjectives and relations."""
    tokens, end = [], 0
    for m in _TOKEN.finditer(caption):
        tokens.append((m.group(1), m.group(2)))
        end = m.end()
    low = [text.lower() for _, text in tokens]
    names = _names([text for _, text in tokens], low)
    slots: list[Slot] = []
    i = 0
    while i < len(low):
        skip = _longest(low, i, _FIXED)[0]  # a fixed phrase
        shade = (
            low[i] in lx.COLOR_SHADES and lx.ADJECTIVE_CATEGORY.get(low[i + 1] if i + 1 < len(low) else "") == "color"
        )
        if not skip and (shade or (i in names and _longest(low, i, lx.noun_forms())[0] < 2)):
            skip = 1  # a shade before a colour, or a name that does not open a lexicon phrase
        if skip:
            i += skip
            continue
        n, rel = _longest(low, i, _RELATIONS)
        # a longer lexicon noun wins: "cutting board" is no verb "cutting"
        if rel is not None and _relation_applies(low, i + n, rel) and _longest(low, i, lx.noun_forms())[0] <= n:
            slots.append(Slot("rel", i, i + n, rel))
            i += n
            continue
        n, form = _longest(low, i, lx.noun_forms())
        if form is not None and not (n == 1 and _adjective_at(low, i)):
            lemma, number = form
            number = _noun_number(low, i, number)
            slots.append(Slot("noun", i, i + n, lemma, number, modifier=_noun_at(low, i + n)))
            i += n
            continue
        if low[i] in lx.ADJECTIVE_CATEGORY and (head := _adjective_head(low, i)) is not None:
            slots.append(Slot("adj", i, i + 1, low[i], head=head))
        i += 1
    return Caption(tokens, caption[end:], low, slots, names)


def _case_like(original: str, new: str) -> str:
    if len(original) > 1 and original.isupper():
        return new.upper()
    return new[:1].upper() + new[1:] if original[:1].isupper() else new


def _render(cap: Caption, changes: dict[int, tuple[int, str]]) -> str:
    """The caption with tokens ``start:end`` replaced by a phrase, for each start in ``changes``;
    an "a"/"an" right before a changed word is made to agree with it."""
    out: list[list[str]] = []
    changed = []
    i = 0
    while i < len(cap.tokens):
        if i not in changes:
            out.append(list(cap.tokens[i]))
            i += 1
            continue
        end, phrase = changes[i]
        changed.append(len(out))
        phrase = phrase if i in cap.names else _case_like(cap.tokens[i][1], phrase)
        out.extend([cap.tokens[i][0] if w == 0 else " ", word] for w, word in enumerate(phrase.split()))
        i = end
    for c in changed:
        if c > 0 and out[c - 1][1].lower() in ("a", "an"):
            out[c - 1][1] = _case_like(out[c - 1][1], lx.article_for(out[c][1]))
    return "".join(ws + text for ws, text in out) + cap.tail


def _permute(cap: Caption, units: list[tuple[int, int]], order: list[int]) -> str:
    """The caption with unit u's place holding unit order[u]'s tokens (units: sorted spans)."""
    starts = {start: (end, order[u]) for u, (start, end) in enumerate(units)}
    out, i = [], 0
    while i < len(cap.tokens):
        if i not in starts:
            out.append(cap.tokens[i][0] + cap.tokens[i][1])
            i += 1
            continue
        end, source = starts[i]
        s, e = units[source]
        out.append(cap.tokens[i][0] + " ".join(text for _, text in cap.tokens[s:e]))
        i = end
    return "".join(out) + cap.tail


def _inflect(noun: str, number: str) -> str | None:
    return lx.plural(noun) if number == "pl" else noun


@cache
def _noun_pool(lemma: str, number: str, same_category: bool) -> tuple[str, ...]:
    """Nouns that may replace ``lemma`` in a slot of ``number``: never a related noun, a generic
    noun, or a mass noun for a count noun (and the reverse); people only by people, the
    synthetic shapes only by shapes (:data:`vlp.data.lexicon.CLOSED_NOUN_CATEGORIES`)."""
    cat = lx.NOUN_CATEGORY[lemma]
    if cat in lx.CLOSED_NOUN_CATEGORIES or same_category:
        cats = (cat,)
    else:
        cats = tuple(c for c in lx.NOUNS if c not in lx.CLOSED_NOUN_CATEGORIES + ("generic",))
    pool = (w for c in cats for w in lx.NOUNS[c] if not lx.nouns_related(w, lemma))
    return tuple(w for w in pool if number != "pl" or lx.plural(w) is not None)


def _choose(rng: random.Random, pool: Sequence[str], exclude: set[str], tries: int = 8) -> str | None:
    for _ in range(tries if pool else 0):
        word = rng.choice(pool)
        if word not in exclude:
            return word
    return None


def _replace_object(cap: Caption, rng: random.Random, budget: int) -> Iterator[str]:
    slots = [s for s in cap.of("noun") if not s.modifier and lx.NOUN_CATEGORY[s.lemma] != "generic"]
    present = {s.lemma for s in cap.of("noun")}
    for _ in range(budget if slots else 0):
        slot = rng.choice(slots)
        new = _choose(rng, _noun_pool(slot.lemma, slot.number, rng.random() < SAME_CATEGORY_P), present)
        if new is not None:
            yield _render(cap, {slot.start: (slot.end, _inflect(new, slot.number))})


def _described(cap: Caption, adj: Slot) -> str | None:
    """Lemma of the lexicon noun an adjective describes: the noun at its head, or for a predicative
    adjective the last noun before it; None for a noun the lexicon lacks."""
    nouns = cap.of("noun")
    if adj.head >= 0:
        return next((s.lemma for s in nouns if s.start == adj.head), None)
    return next((s.lemma for s in reversed(nouns) if s.end <= adj.start), None)


def _animate(cap: Caption, adj: Slot) -> bool:
    return lx.NOUN_CATEGORY.get(_described(cap, adj) or "") in lx.ANIMATE_CATEGORIES


def _replace_attribute(cap: Caption, rng: random.Random, budget: int) -> Iterator[str]:
    slots = cap.of("adj")
    present = {s.lemma for s in slots}
    for _ in range(budget if slots else 0):
        slot = rng.choice(slots)
        pool = lx.adjective_alternatives(slot.lemma, _animate(cap, slot))
        # a word the caption already has only when nothing else contradicts ("a tall man and a short ...")
        new = _choose(rng, pool, present if set(pool) - present else {slot.lemma})
        if new is not None:
            yield _render(cap, {slot.start: (slot.end, new)})


def _replace_relation(cap: Caption, rng: random.Random, budget: int) -> Iterator[str]:
    slots = cap.of("rel")
    for _ in range(budget if slots else 0):
        slot = rng.choice(slots)
        opposites, others = lx.relation_alternatives(slot.lemma)
        pool = opposites if opposites and (rng.random() < OPPOSITE_RELATION_P or not others) else others
        yield _render(cap, {slot.start: (slot.end, rng.choice(pool))})


def _swap_objects(cap: Caption, rng: random.Random, budget: int) -> Iterator[str]:
    """Two nouns change places; each takes the number of its new place."""
    nouns = [s for s in cap.of("noun") if not s.modifier]
    pairs = []
    for a, b in itertools.combinations(nouns, 2):
        into_a, into_b = _inflect(b.lemma, a.number), _inflect(a.lemma, b.number)
        if not lx.nouns_related(a.lemma, b.lemma) and into_a and into_b:
            pairs.append({a.start: (a.end, into_a), b.start: (b.end, into_b)})
    rng.shuffle(pairs)
    for changes in pairs[:budget]:
        yield _render(cap, changes)


def _phrase_after_swap(cap: Caption, adj: Slot, new: str) -> list[str]:
    """The words of the noun phrase of an attributive adjective (determiners and adjectives before
    it, up to its noun) with the adjective replaced by ``new``."""
    start = adj.start
    while start > 0 and (cap.low[start - 1] in lx.DETERMINERS or cap.low[start - 1] in lx.ADJECTIVE_CATEGORY):
        start -= 1
    end = next((s.end for s in cap.of("noun") if s.start == adj.head), adj.head + 1)
    return [new if j == adj.start else cap.low[j] for j in range(start, end)]


def _swap_attributes(cap: Caption, rng: random.Random, budget: int) -> Iterator[str]:
    """Two adjectives of one category describing different nouns change places; not when that only
    exchanges two noun phrases ("a big dog and a small dog" -> "a small dog and a big dog")."""
    adjs = cap.of("adj")
    pairs = [
        {a.start: (a.end, b.lemma), b.start: (b.end, a.lemma)}
        for a, b in itertools.combinations(adjs, 2)
        if lx.ADJECTIVE_CATEGORY[a.lemma] == lx.ADJECTIVE_CATEGORY[b.lemma]
        and a.lemma != b.lemma
        and (a.head != b.head or a.head == -1)
        and (a.head == -1 or b.head == -1 or _phrase_after_swap(cap, a, b.lemma) != _phrase_after_swap(cap, b, b.lemma))
    ]
    rng.shuffle(pairs)
    for changes in pairs[:budget]:
        yield _render(cap, changes)


def _shuffles(cap: Caption, rng: random.Random, budget: int, kind: str) -> Iterator[str]:
    """ARO's word-order perturbations (Yuksekgonul et al. 2023), on word tokens; punctuation stays."""
    if kind == "shuffle_nouns_adjectives":
        slots = [s for s in cap.slots if s.kind in ("noun", "adj")]
        units = [(s.start, s.end) for s in slots]
        groups = [[u for u, s in enumerate(slots) if s.kind == part] for part in ("noun", "adj")]
    else:
        units = [(i, i + 1) for i, t in enumerate(cap.low) if _is_word(t)]
        groups = [list(range(len(units)))]
    text = [" ".join(cap.low[s:e]) for s, e in units]
    if all(len({text[u] for u in group}) < 2 for group in groups):
        return  # every order reads the same
    for _ in range(budget):
        order = list(range(len(units)))
        for group in groups:
            if kind == "shuffle_trigrams":
                trigrams = [group[i : i + 3] for i in range(0, len(group), 3)]
                rng.shuffle(trigrams)
                moved = [u for tri in trigrams for u in tri]
            elif kind == "shuffle_within_trigrams":
                moved = []
                for i in range(0, len(group), 3):
                    moved += rng.sample(group[i : i + 3], len(group[i : i + 3]))
            else:
                moved = rng.sample(group, len(group))
            for place, source in zip(group, moved):
                order[place] = source
        yield _permute(cap, units, order)


_GENERATORS = {
    "replace_object": _replace_object,
    "replace_attribute": _replace_attribute,
    "replace_relation": _replace_relation,
    "swap_objects": _swap_objects,
    "swap_attributes": _swap_attributes,
}


def check_types(types: Sequence[str]) -> tuple[str, ...]:
    """``types`` as a tuple without repeats; ValueError naming the valid ones on an unknown type."""
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise ValueError(f"unknown negative type(s) {unknown or '(none given)'}; choose from {', '.join(TYPES)}")
    return tuple(dict.fromkeys(types))


class NegativeGenerator:
    """Rule-based negatives of the given types; see :func:`generate`."""

    def __init__(self, types: Sequence[str] = TYPES):
        self.types = check_types(types)

    def candidates(self, caption: str, k: int, seed: int) -> Iterator[tuple[str, str]]:
        """(text, type) candidates, unvalidated: the types take turns in a seeded order, each
        drawing from its own generator (seeded by (seed, type)) until it has nothing more."""
        cap = parse(caption)
        budget = 3 * k + 8
        order = list(self.types)
        random.Random(f"{seed}/order").shuffle(order)
        streams = {}
        for kind in order:
            rng = random.Random(f"{seed}/{kind}")
            if kind in _GENERATORS:
                streams[kind] = _GENERATORS[kind](cap, rng, budget)
            else:
                streams[kind] = _shuffles(cap, rng, budget, kind)
        while streams:
            for kind in list(streams):
                text = next(streams[kind], None)
                if text is None:
                    del streams[kind]
                else:
                    yield text, kind

    def __call__(self, caption: str, k: int, seed: int, positives: Iterable[str] = ()) -> list[tuple[str, str]]:
        if k <= 0:
            return []
        return validate_negatives(self.candidates(caption, k, seed), caption, positives, k)


def generate(
    caption: str, types: Sequence[str], k: int, seed: int, positives: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """Up to ``k`` hard negatives of ``caption`` as (text, type) pairs, the same for the same seed.

    The requested ``types`` (names in :data:`TYPES`) that apply to the caption take turns;
    a type that does not apply (no relation to replace, ...) gives nothing. No negative equals
    the caption, one of ``positives`` (other captions of the image) or another negative, after
    lower-casing and collapsing whitespace. Raises ValueError on an unknown type.
    """
    return NegativeGenerator(types)(caption, k, seed, positives or ())

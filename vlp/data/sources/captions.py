"""Captions from clip-art metadata: title cleaning, keyword filtering and caption recipes.

Everything here is a pure function of one sample's metadata, so a sample's captions never
depend on which other files were converted with it.

Recipes (:func:`caption_variants`), for title "red apple" and keywords ["fruit", "food"]:

    primary        "red apple, fruit, food"                  title + up to 3 keywords (the ``txt``)
    title          "red apple"
    drawing        "a drawing of red apple"
    illustration   "an illustration of red apple, related to fruit and food"   (needs a keyword)
"""

from __future__ import annotations

import html
import re

MAX_PRIMARY_KEYWORDS = 3
MAX_KEYWORD_CHARS = 24
MAX_KEYWORD_WORDS = 3
# Words that make a whole title a collection/batch label ("Lemon SVG theme", "Etiquette Icons",
# "Part of the Flat Icon Collection"): such a title says nothing about its image.
COLLECTION_WORDS = frozenset(
    {"collection", "theme", "themes", "icons", "iconset", "cliparts", "clipart", "svg", "sibmission", "submission"}
)
# Title words that carry no content; a title made only of these is generic too.
EMPTY_TITLE_WORDS = frozenset(
    {"untitled", "drawing", "image", "picture", "new", "document", "layer", "clip", "art", "various", "the", "of", "a"}
)
# Dropped from a final title ("05_fullmoon_openclipart" -> "fullmoon").
TITLE_ARCHIVE_WORDS = frozenset({"openclipart", "clipart", "svg"})
# Keywords that describe the medium, the archive or its bookkeeping, not the picture.
GENERIC_KEYWORDS = frozenset(
    {
        "icon", "icons", "theme", "themes", "clip art", "clipart", "clip-art", "cliparts", "svg", "openclipart",
        "open clip art", "image", "images", "picture", "pictures", "remix", "public domain", "publicdomain", "pd",
        "cc0", "unsorted", "hash", "magick", "special", "untitled", "drawing", "drawings", "illustration",
        "graphic", "graphics", "vector", "art", "artwork", "free", "inkscape", "other", "misc", "miscellaneous",
        "stuff", "new", "simple", "mimetypes", "mime types", "mime-types", "appicon", "webpage", "menu", "action",
        "application", "media", "signs and symbols", "color", "colour", "black and white", "bw", "line art",
        "lineart", "outline",
    }
)  # fmt: skip
# A keyword containing one of these words is an archive label ("lemon_theme_icon").
MARKER_WORDS = frozenset({"theme", "clipart", "openclipart", "svg", "iconset"})

_ATTRIBUTION = re.compile(r"^\s*clip\s*-?\s*arts?\s+by\s+[^-–:]+\s[-–:]\s*", re.IGNORECASE)
_PAREN_WITH_DIGIT = re.compile(r"\([^)]*\d[^)]*\)")
_EXTENSION = re.compile(r"\.(?:svg|svgz|png|jpe?g|gif)\b", re.IGNORECASE)
_VERSION = re.compile(r"v\d+(?:\.\d+)*")
_NUMBER = re.compile(r"\d+(?:[.:,/]\d+)*")
_WORD_THEN_INDEX = re.compile(r"([a-z]{3,})\d+")  # "smiley111", "arrow08"
_HEX_ID = re.compile(r"0x[0-9a-f]+|(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{6,}")  # ids, hashes
_NO_LETTERS = re.compile(r"[^a-z]*")
_EDGE_PUNCT = "\"'`.,;:!?()[]{}<>*#|/\\~+=-–"


def _split_hyphens(text: str, always: bool) -> str:
    """File-name hyphens become spaces ("arrow-down-seagreen"); "t-shirt" and "x-ray" stay."""
    if always:
        return re.sub(r"[-.]+", " ", text)
    out = []
    for token in text.split():
        parts = token.split("-")
        out.append(" ".join(parts) if len(parts) > 1 and all(len(p) >= 3 for p in parts) else token)
    return " ".join(out)


def _clean_tokens(tokens: list[str]) -> list[str]:
    """Drop versions and zero-padded/trailing numbers; strip an index glued to a word."""
    kept = []
    for i, raw in enumerate(tokens):
        token = raw.strip(_EDGE_PUNCT)
        if not token or _VERSION.fullmatch(token):
            continue
        if _NUMBER.fullmatch(token):
            # "2 dead frogs" keeps its count; "dog 03 ...", "jigsaw red 10" lose their file index
            last = all(not t.strip(_EDGE_PUNCT) for t in tokens[i + 1 :])
            if token.startswith("0") or last or len(token) > 4:
                continue
        elif m := _WORD_THEN_INDEX.fullmatch(token):
            token = m.group(1)
        kept.append(token)
    return kept


def clean_title(raw: str | None, *, file_name: bool = False) -> str:
    """A lower-case caption title from a ``dc:title`` (or, with ``file_name``, a file stem).

    Removes "Clipart by NAME - " attributions, parenthesised dates, file extensions, version
    tags, underscores, file-name hyphens and trailing/zero-padded index numbers; " - " becomes
    ", ". Returns "" when nothing is left.
    """
    text = html.unescape(raw or "").lower()  # entities escaped twice survive XML parsing
    text = _ATTRIBUTION.sub("", text)
    text = _PAREN_WITH_DIGIT.sub(" ", text)
    text = _EXTENSION.sub(" ", text).replace("_", " ")
    text = re.sub(r"\s+[-–]\s+", " , ", text)  # "spain - catalunya" -> "spain , catalunya"
    text = _split_hyphens(text, always=file_name)
    pieces = [" ".join(_clean_tokens(part.split())) for part in text.split(",")]
    return ", ".join(p for p in pieces if p).strip(_EDGE_PUNCT + " ")


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text) if w]


def _stem(word: str) -> str:
    """Crude singular, enough to match "flags" with "flag"."""
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def is_generic_title(title: str) -> bool:
    """True for collection labels ("lemon svg theme") and titles with no content word."""
    words = _words(title)
    if not any(len(w) >= 3 and not _NO_LETTERS.fullmatch(w) for w in words):
        return True
    return any(w in COLLECTION_WORDS for w in words) or all(w in EMPTY_TITLE_WORDS for w in words)


def caption_title(raw_title: str | None, file_stem: str) -> tuple[str, str]:
    """(title, where it came from: "metadata" or "file_name"); ("", "metadata") if none.

    A generic title (:func:`is_generic_title`) or a file-name-like attribution ("Clipart by
    NAME - jigsaw_red_10", stamped on a whole batch of files) is replaced by the cleaned file
    stem when that has a content word. Archive words ("svg", "clipart") are then dropped.
    """
    title = clean_title(raw_title)
    if not title:
        return "", "metadata"
    source = "metadata"
    attribution = _ATTRIBUTION.match(raw_title or "")
    batch_label = attribution is not None and not re.search(r"\s", raw_title[attribution.end() :].strip())
    if is_generic_title(title) or batch_label:
        stem = clean_title(file_stem, file_name=True)
        if stem and not is_generic_title(stem):
            title, source = stem, "file_name"
    words = title.split(" ")
    kept = [w for w in words if w.strip(",") not in TITLE_ARCHIVE_WORDS]
    return (" ".join(kept).strip(" ,") or title), source


def _keyword_is_junk(keyword: str, title_stems: set[str], creator_words: set[str]) -> bool:
    words = keyword.split()
    if len(keyword) < 2 or len(keyword) > MAX_KEYWORD_CHARS or len(words) > MAX_KEYWORD_WORDS:
        return True
    if keyword in GENERIC_KEYWORDS or all(w in GENERIC_KEYWORDS for w in words):
        return True
    if any(w in MARKER_WORDS for w in words) or any(_HEX_ID.fullmatch(w) for w in words):
        return True
    if _NO_LETTERS.fullmatch(keyword) or sum(c.isdigit() for c in keyword) * 2 >= len(keyword.replace(" ", "")):
        return True  # numbers, dates, "r2" ids
    if creator_words and set(words) <= creator_words:
        return True  # the author's name as a tag
    return all(_stem(w) in title_stems for w in words)


def _expand(keywords: list | None) -> list[str]:
    """Normalised keywords; a field holding a list ("rome,italy", "space astronomy planet mars")
    is split into its items."""
    out = []
    for raw in keywords or []:
        if not isinstance(raw, str):
            continue
        for piece in re.split(r"[,;]", html.unescape(raw).lower().replace("_", " ")):
            words = [w.strip(_EDGE_PUNCT) for w in piece.split()]
            out.extend(words if len(words) > MAX_KEYWORD_WORDS else [" ".join(words)])
    return [k for k in out if k]


def filter_keywords(keywords: list | None, title: str, creator: str = "") -> list[str]:
    """Informative keywords: lower-case, ``_`` -> space, in input order, duplicates dropped;
    a field listing several (comma-separated, or over 3 words) counts as its items.

    Drops non-strings and blanks, single characters, tokens over 24 characters or 3 words,
    hashes/hex ids, numbers, generic archive words (:data:`GENERIC_KEYWORDS`), archive labels
    ("lemon_theme_icon"), the creator's name and keywords whose words all repeat title words.
    """
    title_stems = {_stem(w) for w in _words(title)}
    creator_words = set(_words(clean_title(creator)))
    kept: list[str] = []
    seen: set[str] = set()
    for keyword in _expand(keywords):
        key = " ".join(_stem(w) for w in keyword.split())
        if key in seen or _keyword_is_junk(keyword, title_stems, creator_words):
            continue
        seen.add(key)
        kept.append(keyword)
    return kept


def _join_and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def primary_caption(title: str, keywords: list[str]) -> str:
    """The ``txt`` caption: the title then up to 3 keywords, comma-separated."""
    return ", ".join([title, *keywords[:MAX_PRIMARY_KEYWORDS]])


def caption_variants(title: str, keywords: list[str]) -> list[str]:
    """Every recipe's caption, primary first, duplicates dropped (see the module docstring)."""
    variants = [primary_caption(title, keywords), title, f"a drawing of {title}"]
    if keywords:
        variants.append(f"an illustration of {title}, related to {_join_and(keywords[:2])}")
    return list(dict.fromkeys(variants))

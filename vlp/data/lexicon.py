"""Word lists for the rule-based hard-negative generator (:mod:`vlp.data.negatives`).

All entries are lower case; a multi-word entry ("hot dog", "in front of") is matched as a
sequence of tokens. A replacement must make the caption *false*, so the lists also say which
words never replace each other: synonyms and a word and its hypernym ("bike"/"bicycle",
"bird"/"pigeon"), adjectives of one group ("big"/"large"), relations of one group
("under"/"below"). Words of ``OPPOSITE_ADJECTIVES`` categories are not mutually exclusive
("wet", "dirty"), so they are only replaced by their opposite group.
"""

from __future__ import annotations

from functools import cache

NOUNS: dict[str, tuple[str, ...]] = {
    # person and role nouns are only exchanged within their own category: a man can be a skier
    "person": ("man", "woman", "boy", "girl", "baby", "lady", "guy", "gentleman"),
    "role": (
        "skier", "surfer", "skateboarder", "snowboarder", "chef", "doctor", "nurse", "farmer", "soldier",
        "police officer", "cyclist", "runner", "dancer", "musician", "tourist", "fisherman", "pilot",
        "waiter", "clown", "cowboy", "baseball player", "tennis player", "soccer player",
    ),
    # generic: never replaced and never a replacement (a person *is* a man or a woman)
    "generic": ("person", "child", "kid", "adult", "teenager", "crowd", "family", "couple", "player", "rider"),
    "animal": (
        "dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear", "lion",
        "tiger", "monkey", "duck", "fish", "mouse", "rabbit", "deer", "goat", "pig", "chicken", "owl",
        "squirrel", "fox", "wolf", "snake", "frog", "turtle", "butterfly", "bee", "puppy", "kitten",
        "pony", "camel", "penguin", "dolphin", "whale", "shark", "seagull", "pigeon", "parrot",
        "donkey", "goose", "swan", "lamb", "calf", "spider", "crab",
    ),
    "vehicle": (
        "car", "truck", "bus", "train", "bicycle", "bike", "motorcycle", "boat", "airplane", "plane",
        "helicopter", "van", "taxi", "tractor", "scooter", "ship", "canoe", "kayak", "jeep", "tram",
        "trailer", "wagon", "cart", "ambulance", "fire truck", "sailboat", "yacht", "jet",
    ),
    "furniture": (
        "table", "chair", "couch", "sofa", "bed", "lamp", "desk", "shelf", "cabinet", "door", "window",
        "mirror", "clock", "bench", "stool", "dresser", "bookcase", "armchair", "drawer", "counter",
    ),
    "household": (
        "vase", "cup", "mug", "plate", "bowl", "bottle", "glass", "fork", "knife", "spoon", "pot", "pan",
        "oven", "microwave", "refrigerator", "fridge", "sink", "toilet", "bathtub", "towel", "pillow",
        "blanket", "rug", "curtain", "television", "tv", "laptop", "computer", "keyboard", "phone",
        "cell phone", "remote", "book", "box", "bag", "basket", "suitcase", "backpack", "umbrella",
        "candle", "picture", "painting", "toy", "teddy bear", "doll", "toothbrush", "bucket", "broom",
        "camera", "guitar", "piano", "teapot", "jar", "tray", "key", "balloon", "newspaper", "wheel",
    ),
    "sports": (
        "kite", "frisbee", "skateboard", "surfboard", "snowboard", "racket", "bat", "net",
        "goal", "ski pole", "glove",
    ),
    "clothing": (
        "hat", "shirt", "jacket", "dress", "coat", "shoe", "boot", "helmet", "scarf", "tie", "sweater",
        "skirt", "cap", "sock", "belt", "uniform", "suit", "vest", "hoodie", "necklace",
    ),
    "food": (
        "apple", "banana", "orange", "pizza", "sandwich", "cake", "donut", "carrot", "hot dog", "egg",
        "tomato", "potato", "lemon", "strawberry", "cookie", "burger", "pie", "pear", "peach", "cherry",
        "onion", "pepper", "cucumber", "muffin", "cupcake", "pineapple", "watermelon", "mango",
        "sausage", "pancake",
    ),
    "place": (
        "tree", "flower", "plant", "bush", "rock", "stone", "mountain", "hill", "river", "lake", "beach",
        "cloud", "field", "forest", "road", "street", "path", "sidewalk", "bridge", "building", "house",
        "tower", "fence", "wall", "sign", "stop sign", "pole", "park", "garden", "kitchen", "bathroom",
        "bedroom", "room", "shop", "church", "castle", "barn", "tent", "pond", "island", "fire hydrant",
        "traffic light", "street light", "parking meter",
    ),
    # the synthetic shapes vocabulary (vlp.data.synthetic): only exchanged with one another
    "shape": ("circle", "square", "triangle", "star", "cross", "diamond"),
    "figure": (
        "rectangle", "hexagon", "pentagon", "heart", "oval", "arrow", "cube", "sphere", "cone", "cylinder",
        "pyramid", "ball",
    ),
    # mass nouns: no plural; only exchanged with one another
    "mass": (
        "grass", "sand", "snow", "water", "sky", "ice", "mud", "dirt", "rice", "bread", "cheese",
        "salad", "soup", "coffee", "tea", "milk", "juice", "wine", "beer", "broccoli", "meat", "pasta",
    ),
}  # fmt: skip

# Categories whose nouns are only replaced by nouns of the same category, and never replace others.
CLOSED_NOUN_CATEGORIES = ("person", "role", "shape", "mass")

# Each group: words that mean the same thing here, or one word and its kinds (its hyponyms).
# No two words of a group replace each other.
NOUN_GROUPS = (
    "man|guy|gentleman", "woman|lady", "bike|bicycle|motorcycle", "plane|airplane|jet", "couch|sofa",
    "fridge|refrigerator", "tv|television", "cup|mug|glass", "hat|cap", "dog|puppy", "cat|kitten",
    "horse|pony", "cow|calf", "sheep|lamb", "car|taxi|jeep", "truck|fire truck", "train|tram",
    "phone|cell phone", "computer|laptop", "cake|cupcake", "rock|stone", "road|street|path",
    "room|kitchen|bathroom|bedroom", "shoe|boot", "fish|shark", "jacket|coat", "burger|sandwich",
    "hill|mountain", "lake|pond", "picture|painting", "toy|doll|teddy bear|balloon",
    "sign|stop sign", "circle|oval", "square|rectangle", "pole|ski pole", "bowl|pot",
    "boat|ship|sailboat|yacht|canoe|kayak",
    "bird|seagull|pigeon|parrot|owl|duck|goose|swan|penguin|chicken",
    "building|house|barn|church|castle|tower|shop",
    "plant|flower|bush|tree",
)  # fmt: skip

IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "goose": "geese", "gentleman": "gentlemen", "fisherman": "fishermen", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "knife": "knives", "shelf": "shelves", "wolf": "wolves",
    "scarf": "scarves", "calf": "calves", "tomato": "tomatoes", "potato": "potatoes",
    "mango": "mangoes", "bus": "buses", "tv": "tvs",
}  # fmt: skip

# Categories whose groups exclude each other: any other group of the category is a negative.
# A replacement is the first (most common) word of a group; the others are only recognised.
EXCLUSIVE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "color": (
        "red maroon", "green", "blue navy", "yellow golden", "purple violet", "orange", "black",
        "white", "brown", "pink", "gray grey silver", "beige", "turquoise teal",
    ),
    "size": ("small little tiny", "large big huge giant enormous"),
    "material": (
        "wooden", "metal metallic steel", "plastic", "glass", "leather", "stone", "brick", "concrete",
        "paper cardboard", "cotton woolen", "ceramic", "rubber", "marble", "wicker",
    ),
    "pattern": ("striped", "spotted dotted", "checkered plaid", "floral", "plain"),
    "shape": ("round circular oval", "square rectangular", "triangular"),
}  # fmt: skip

# Categories of opposite pairs: a word is replaced only by a word of the other group of its pair.
OPPOSITE_ADJECTIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "state": (
        ("open", "closed"), ("empty", "full"), ("wet", "dry"), ("clean", "dirty"), ("sliced", "whole"),
        ("cooked", "raw"), ("broken", "intact"), ("awake", "asleep sleeping"),
    ),
    "age": (("young", "old elderly"),),
    "height": (("tall high", "short low"),),
    "temperature": (("hot warm", "cold frozen"),),
    "mood": (("happy smiling", "sad crying"),),
    "brightness": (("bright", "dark dim"),),
    "texture": (("smooth", "rough bumpy"), ("soft fluffy furry fuzzy", "hard")),
    "weight": (("heavy", "light"), ("thick", "thin"), ("fat", "skinny")),
    "speed": (("fast", "slow"),),
}  # fmt: skip

# Spatial relation groups; relations of one group never replace each other.
SPATIAL_GROUPS = {
    "above": "on|on top of|above|over|atop",
    "below": "under|below|beneath|underneath",
    "in": "in|inside|into|within",
    "out": "outside|out of",
    "front": "in front of",
    "behind": "behind",
    "near": "next to|beside|near|close to|against",
    "far": "far from|away from",
    "left": "left of|to the left of|on the left of",
    "right": "right of|to the right of|on the right of",
    "top": "at the top of",
    "bottom": "at the bottom of",
    "with": "with",
    "without": "without",
    "toward": "toward|towards",
    "around": "around",
    "across": "across from",
}
# Action relations (a verb taking an object) by group.
ACTION_GROUPS = {
    "hold": "holding|carrying",
    "push": "pushing",
    "pull": "pulling",
    "throw": "throwing",
    "catch": "catching",
    "ride": "riding",
    "drive": "driving",
    "eat": "eating|biting",
    "drink": "drinking",
    "wear": "wearing",
    "watch": "watching|looking at",
    "chase": "chasing",
    "follow": "following",
    "lead": "leading",
    "feed": "feeding",
    "hug": "hugging",
    "kick": "kicking",
    "cut": "cutting",
    "pet": "petting|touching",
    "walk": "walking",
    "fly": "flying",
    "lift": "lifting",
    "drop": "dropping",
    "wash": "washing",
    "read": "reading",
    "play": "playing with",
}
# Opposite relation groups: tried first when replacing a relation.
RELATION_OPPOSITES = (
    ("above", "below"), ("in", "out"), ("front", "behind"), ("near", "far"), ("left", "right"),
    ("top", "bottom"), ("with", "without"), ("toward", "far"), ("push", "pull"), ("throw", "catch"),
    ("chase", "follow"), ("lead", "follow"), ("lift", "drop"),
)  # fmt: skip

DETERMINERS = frozenset((
    "a", "an", "the", "this", "that", "these", "those", "some", "any", "each", "every", "no", "his", "her",
    "its", "their", "my", "your", "our", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "many", "several", "few", "both", "another", "multiple",
))  # fmt: skip
# Determiners that make the noun after them plural; they decide the number of a noun whose two
# forms are the same ("sheep", "fish").
PLURAL_DETERMINERS = frozenset((
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "several", "these",
    "those", "some", "few", "both", "multiple",
))  # fmt: skip
# Words that are never an unknown noun: determiners, conjunctions, pronouns, prepositions, ...
FUNCTION_WORDS = DETERMINERS | frozenset((
    "and", "or", "but", "nor", "is", "are", "was", "were", "be", "been", "being", "has", "have", "had",
    "it", "they", "he", "she", "we", "there", "here", "who", "which", "while", "of", "to", "for", "at",
    "from", "as", "by", "up", "down", "along", "across", "through", "past", "off", "onto", "upon",
    "during", "very", "really", "quite", "not",
))  # fmt: skip
# Before a predicative adjective ("the car is red").
COPULAS = frozenset(("is", "are", "was", "were", "be", "been", "being", "looks", "look", "appears", "seems"))
# Words starting with a vowel letter but a consonant sound, and the reverse.
_A_BEFORE_VOWEL = ("uni", "use", "usu", "uten", "euro", "one", "once", "ufo")
_AN_BEFORE_CONSONANT = ("hour", "honest", "honor", "honour", "heir")


def plural(noun: str) -> str | None:
    """Plural of a lexicon noun (the last word of a compound inflects); None for mass nouns."""
    if noun in NOUNS["mass"]:
        return None
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        form = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        form = last + "es"
    elif last.endswith("y") and last[-2:-1] not in ("a", "e", "i", "o", "u"):
        form = last[:-1] + "ies"
    else:
        form = last + "s"
    return f"{head} {form}" if head else form


def article_for(word: str) -> str:
    """``a`` or ``an`` before ``word``, by its first sound."""
    w = word.lower()
    if w.startswith(_AN_BEFORE_CONSONANT):
        return "an"
    if w.startswith(_A_BEFORE_VOWEL):
        return "a"
    return "an" if w[:1] in ("a", "e", "i", "o", "u") else "a"


NOUN_CATEGORY = {noun: cat for cat, nouns in NOUNS.items() for noun in nouns}
ADJECTIVE_CATEGORY = {
    adj: cat
    for table in (EXCLUSIVE_ADJECTIVES, {c: [g for pair in p for g in pair] for c, p in OPPOSITE_ADJECTIVES.items()})
    for cat, groups in table.items()
    for group in groups
    for adj in group.split()
}
RELATION_KIND = {
    rel: (kind, group)
    for kind, table in (("spatial", SPATIAL_GROUPS), ("action", ACTION_GROUPS))
    for group, rels in table.items()
    for rel in rels.split("|")
}
_NOUN_GROUP_OF: dict[str, set[int]] = {}
for _i, _group in enumerate(NOUN_GROUPS):
    for _noun in _group.split("|"):
        _NOUN_GROUP_OF.setdefault(_noun, set()).add(_i)


def nouns_related(a: str, b: str) -> bool:
    """True when one noun may name what the other names (same word, synonyms, hypernym)."""
    return a == b or bool(_NOUN_GROUP_OF.get(a, set()) & _NOUN_GROUP_OF.get(b, set()))


@cache
def noun_forms() -> dict[tuple[str, ...], tuple[str, str]]:
    """{token tuple of a form: (lemma, number)}; number "sg", "pl", or "any" (sheep) / "mass"."""
    forms: dict[tuple[str, ...], tuple[str, str]] = {}
    for noun in NOUN_CATEGORY:
        pl = plural(noun)
        if pl is None or pl == noun:
            forms[tuple(noun.split())] = (noun, "mass" if pl is None else "any")
            continue
        forms[tuple(noun.split())] = (noun, "sg")
        forms.setdefault(tuple(pl.split()), (noun, "pl"))
    return forms


@cache
def adjective_alternatives(adj: str) -> tuple[str, ...]:
    """Adjectives that contradict ``adj``: the first word of every other group of its category
    (exclusive categories) or of the other group of its pair (opposite categories)."""
    cat = ADJECTIVE_CATEGORY[adj]
    if cat in EXCLUSIVE_ADJECTIVES:
        return tuple(g.split()[0] for g in EXCLUSIVE_ADJECTIVES[cat] if adj not in g.split())
    for a, b in OPPOSITE_ADJECTIVES[cat]:
        if adj in a.split():
            return (b.split()[0],)
        if adj in b.split():
            return (a.split()[0],)
    return ()


@cache
def relation_alternatives(rel: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(opposites, others) of a relation: words of its opposite groups, and of every other
    group of its kind (spatial or action)."""
    kind, group = RELATION_KIND[rel]
    opposite = {b for a, b in RELATION_OPPOSITES if a == group} | {a for a, b in RELATION_OPPOSITES if b == group}
    table = SPATIAL_GROUPS if kind == "spatial" else ACTION_GROUPS
    first = tuple(r for g in sorted(opposite) for r in table[g].split("|"))
    rest = tuple(r for g, rels in table.items() if g != group and g not in opposite for r in rels.split("|"))
    return first, rest

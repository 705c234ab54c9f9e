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
        "waiter", "clown", "cowboy", "baseball player", "tennis player", "soccer player", "umpire", "batter",
        "catcher", "pitcher",
    ),
    # generic: never replaced and never a replacement (a person *is* a man or a woman)
    "generic": ("person", "child", "kid", "adult", "teenager", "crowd", "family", "couple", "player", "rider"),
    "animal": (
        "dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear", "lion",
        "tiger", "monkey", "duck", "fish", "mouse", "rabbit", "deer", "goat", "pig", "chicken", "owl",
        "squirrel", "fox", "wolf", "snake", "frog", "turtle", "butterfly", "bee", "puppy", "kitten",
        "pony", "camel", "penguin", "dolphin", "whale", "shark", "seagull", "pigeon", "parrot",
        "donkey", "goose", "swan", "lamb", "calf", "spider", "crab", "polar bear",
    ),
    "vehicle": (
        "car", "truck", "bus", "train", "bicycle", "bike", "motorcycle", "boat", "airplane", "plane",
        "helicopter", "van", "taxi", "tractor", "scooter", "ship", "canoe", "kayak", "jeep", "tram",
        "trailer", "wagon", "cart", "ambulance", "fire truck", "sailboat", "yacht", "jet", "jetliner", "airliner",
        "double decker bus", "school bus",
    ),
    "furniture": (
        "table", "chair", "couch", "sofa", "bed", "lamp", "desk", "shelf", "cabinet", "door", "window",
        "mirror", "clock", "bench", "stool", "dresser", "bookcase", "armchair", "drawer", "counter",
        "coffee table", "dining table", "high chair", "fireplace", "window sill",
    ),
    "household": (
        "vase", "cup", "mug", "plate", "bowl", "bottle", "glass", "fork", "knife", "spoon", "pot", "pan",
        "oven", "microwave", "refrigerator", "fridge", "sink", "toilet", "bathtub", "towel", "pillow",
        "blanket", "rug", "curtain", "television", "tv", "laptop", "computer", "keyboard", "phone",
        "cell phone", "remote", "book", "box", "bag", "basket", "suitcase", "backpack", "umbrella",
        "candle", "picture", "painting", "toy", "teddy bear", "doll", "toothbrush", "bucket", "broom",
        "camera", "guitar", "piano", "teapot", "jar", "tray", "key", "balloon", "newspaper", "wheel",
        "flat screen tv", "flat screen television", "remote control", "computer monitor", "monitor", "wine glass",
        "hair dryer", "cutting board", "stuffed animal", "stove",
    ),
    "sports": (
        "kite", "frisbee", "skateboard", "surfboard", "snowboard", "racket", "bat", "net",
        "goal", "ski pole", "glove", "tennis racket", "baseball bat", "baseball glove", "soccer ball", "tennis ball",
    ),
    "clothing": (
        "hat", "shirt", "jacket", "dress", "coat", "shoe", "boot", "helmet", "scarf", "tie", "sweater",
        "skirt", "cap", "sock", "belt", "uniform", "suit", "vest", "hoodie", "necklace", "baseball cap",
    ),
    "food": (
        "apple", "banana", "orange", "pizza", "sandwich", "cake", "donut", "carrot", "hot dog", "egg",
        "tomato", "potato", "lemon", "strawberry", "cookie", "burger", "pie", "pear", "peach", "cherry",
        "onion", "pepper", "cucumber", "muffin", "cupcake", "pineapple", "watermelon", "mango",
        "sausage", "pancake", "ice cream", "ice cream cone", "french fry",
    ),
    "place": (
        "tree", "flower", "plant", "bush", "rock", "stone", "mountain", "hill", "river", "lake", "beach",
        "cloud", "field", "forest", "road", "street", "path", "sidewalk", "bridge", "building", "house",
        "tower", "fence", "wall", "sign", "stop sign", "pole", "park", "garden", "kitchen", "bathroom",
        "bedroom", "room", "shop", "church", "castle", "barn", "tent", "pond", "island", "fire hydrant",
        "traffic light", "street light", "parking meter", "christmas tree", "living room", "dining room",
        "street sign", "bus stop", "train station", "parking lot", "tennis court", "baseball field", "soccer field",
        "ski slope", "clock tower", "slope", "hillside", "ocean", "sea", "desert", "pasture", "yard", "city",
        "harbor", "airport", "runway", "station", "market", "restaurant", "fountain",
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
    "man|guy|gentleman", "woman|lady", "bike|bicycle|motorcycle", "plane|airplane|jet|jetliner|airliner", "couch|sofa",
    "fridge|refrigerator", "tv|television|flat screen tv|flat screen television", "cup|mug|glass|wine glass",
    "hat|cap|baseball cap", "dog|puppy", "cat|kitten",
    "horse|pony", "cow|calf", "sheep|lamb", "car|taxi|jeep", "truck|fire truck", "train|tram",
    "phone|cell phone", "computer|laptop", "cake|cupcake", "rock|stone", "road|street|path",
    "room|kitchen|bathroom|bedroom|living room|dining room", "shoe|boot", "fish|shark", "jacket|coat",
    "burger|sandwich", "hill|mountain|slope|ski slope|hillside", "ocean|sea", "airport|runway", "garden|yard",
    "station|train station", "shop|market", "lake|pond", "picture|painting",
    "toy|doll|teddy bear|balloon|stuffed animal",
    "sign|stop sign|street sign", "circle|oval", "square|rectangle", "pole|ski pole", "bowl|pot",
    "bus|double decker bus|school bus", "bear|polar bear", "table|coffee table|dining table", "chair|high chair",
    "remote|remote control", "computer|computer monitor|monitor", "ball|soccer ball|tennis ball",
    "racket|tennis racket", "bat|baseball bat", "glove|baseball glove", "ice cream|ice cream cone",
    "field|baseball field|soccer field|pasture", "baseball player|batter|catcher|pitcher", "oven|stove",
    "boat|ship|sailboat|yacht|canoe|kayak",
    "bird|seagull|pigeon|parrot|owl|duck|goose|swan|penguin|chicken",
    "building|house|barn|church|castle|tower|shop|clock tower|restaurant", "window|window sill",
    "plant|flower|bush|tree|christmas tree",
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
    "size": ("small little tiny mini miniature", "large big huge giant enormous massive gigantic"),
    "material": (
        "wooden wood", "metal metallic steel iron aluminum", "plastic", "glass", "leather", "stone", "brick",
        "concrete", "paper cardboard", "cotton woolen wool", "ceramic porcelain", "rubber", "marble granite",
        "wicker straw", "denim", "silk", "bamboo",
    ),
    # the ground or surface a scene shows most of
    "terrain": ("grassy", "snowy snow-covered", "sandy", "rocky", "muddy"),
    "pattern": ("striped", "spotted dotted", "checkered plaid", "floral", "plain"),
    "shape": ("round circular oval", "square rectangular", "triangular"),
}  # fmt: skip

# Categories of opposite pairs: a word is replaced only by a word of the other group of its pair.
OPPOSITE_ADJECTIVES: dict[str, tuple[tuple[str, str], ...]] = {
    "state": (
        ("open", "closed"), ("empty", "full"), ("wet", "dry"), ("clean", "dirty"), ("sliced", "whole"),
        ("cooked", "raw"), ("broken", "intact"), ("awake", "asleep sleeping"), ("fresh", "rotten"),
        ("busy crowded", "quiet deserted"),
    ),
    # the first pair that holds a word is its opposite for people and animals, the last for things
    "age": (("young", "old elderly"), ("new", "old")),
    "height": (("tall high long", "short low"),),
    "weather": (("sunny", "cloudy overcast"), ("calm", "choppy stormy")),
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
# Phrases whose words are never changed: names written in lower case, idioms ("little league").
_FIXED = "little league|high school|fast food|big ben|red sox|golden gate|new york|new zealand"
FIXED_PHRASES = frozenset(tuple(p.split()) for p in _FIXED.split("|"))
# Before a colour adjective they qualify it ("light blue"): neither replaced nor an adjective of their own.
COLOR_SHADES = frozenset(("light", "dark", "bright", "pale", "deep", "pastel"))
# Nouns of these categories are alive: "old" is their opposite of "young" (of "new" for things).
ANIMATE_CATEGORIES = ("person", "role", "generic", "animal")
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
def adjective_alternatives(adj: str, animate: bool = True) -> tuple[str, ...]:
    """Adjectives that contradict ``adj``: the first word of every other group of its category
    (exclusive categories) or of the other group of its pair (opposite categories). A word in two
    pairs ("old": young/old, new/old) takes the first pair for a living thing (``animate``), the
    last for a thing."""
    cat = ADJECTIVE_CATEGORY[adj]
    if cat in EXCLUSIVE_ADJECTIVES:
        return tuple(g.split()[0] for g in EXCLUSIVE_ADJECTIVES[cat] if adj not in g.split())
    pairs = [(a, b) if adj in a.split() else (b, a) for a, b in OPPOSITE_ADJECTIVES[cat] if adj in f"{a} {b}".split()]
    if not pairs:
        return ()
    return (pairs[0 if animate else -1][1].split()[0],)


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

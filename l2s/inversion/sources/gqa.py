"""The gqa source: GQA scene graphs, their name filters, seeded sampling
(see l2s.inversion.sources)."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from l2s.inversion.sources.base import (
    Sample,
    SourceError,
    SourceOptions,
    SourceReport,
    _normalise,
    _Quota,
    _unit,
    per_relation,
)
from l2s.relations import RELATIONS, geneval_relations

GQA_DOWNLOAD = "https://cs.stanford.edu/people/dorarad/gqa/download.html"

# GQA relation names kept, and their canonical relation (see the module docstring).
GQA_RELATIONS = {
    "to the left of": "left of",
    "on the left of": "left of",
    "left of": "left of",
    "to the right of": "right of",
    "on the right of": "right of",
    "right of": "right of",
    "above": "above",
    "below": "below",
}

# Singular words that end in "s" (words ending in "ss" are singular anyway). Pluralia tantum
# ("jeans", "glasses", "scissors") are deliberately absent: "a man left of a jeans" is no caption.
# fmt: off
SINGULAR_S = frozenset({
    "bus", "lens", "canvas", "cactus", "octopus", "asparagus", "hummus", "walrus", "iris",
    "hibiscus", "citrus", "atlas", "gas", "tennis", "bonus", "virus", "platypus", "chassis",
    "christmas", "campus", "circus", "census", "plus", "status", "thermos", "cosmos",
    "apparatus", "fungus", "papyrus", "pelvis", "trellis",
})
# fmt: on

# A small stand-in for WordNet's hypernym relation over common GQA/COCO nouns: parent -> children.
# Transitive (animal > bird > duck). A compound not in the table counts by its head noun, so
# "coffee table" is a table and "baby elephant" an animal; one in it ("hot dog") by itself.
# fmt: off
HYPERNYMS: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "sheep", "bird", "elephant", "bear", "zebra",
               "giraffe", "deer", "goat", "pig", "monkey", "lion", "tiger", "mouse", "rabbit",
               "squirrel", "fish", "pet", "bull", "donkey", "cattle"),
    "pet": ("dog", "cat"),
    "dog": ("puppy", "poodle", "terrier", "retriever"),
    "cat": ("kitten", "kitty"),
    "horse": ("pony", "foal", "stallion", "mare"),
    "cow": ("calf", "bull"),
    "sheep": ("lamb", "ram"),
    "bird": ("duck", "goose", "pigeon", "seagull", "gull", "chicken", "parrot", "owl", "swan",
             "eagle", "crow", "hen", "rooster", "sparrow", "penguin", "flamingo"),
    "person": ("man", "woman", "boy", "girl", "child", "kid", "lady", "guy", "baby", "player",
               "skier", "surfer", "skateboarder", "snowboarder", "rider", "batter", "catcher",
               "umpire", "spectator", "passenger", "driver", "chef", "officer", "policeman",
               "worker", "student", "tourist", "adult", "gentleman", "human", "pedestrian",
               "people"),
    "child": ("boy", "girl", "kid", "baby", "toddler"),
    "man": ("gentleman", "guy", "policeman"),
    "woman": ("lady",),
    "vehicle": ("car", "bus", "truck", "motorcycle", "bicycle", "bike", "train", "van", "taxi",
                "cab", "scooter", "boat", "airplane", "plane", "jet", "jeep", "suv", "tractor",
                "trailer", "ambulance", "minivan", "motorbike", "helicopter", "wagon", "cart"),
    "car": ("taxi", "cab", "suv", "jeep", "minivan", "sedan"),
    "bike": ("bicycle", "motorcycle", "motorbike"),
    "airplane": ("jet", "plane", "airliner"),
    "furniture": ("chair", "table", "couch", "sofa", "bed", "desk", "bench", "cabinet", "shelf",
                  "dresser", "stool", "ottoman", "nightstand", "armchair", "bookshelf",
                  "cupboard", "drawer", "seat"),
    "seat": ("chair", "bench", "stool", "couch", "sofa", "armchair", "saddle"),
    "chair": ("armchair", "recliner"),
    "couch": ("sofa",),
    "clothing": ("shirt", "jacket", "coat", "hat", "cap", "dress", "skirt", "sweater", "jersey",
                 "hoodie", "vest", "scarf", "glove", "shoe", "boot", "sneaker", "sock", "tie",
                 "uniform", "outfit", "apparel", "garment", "top", "blouse", "suit", "helmet"),
    "shirt": ("t-shirt", "tee", "polo", "blouse", "jersey"),
    "hat": ("cap", "beanie", "helmet"),
    "shoe": ("sneaker", "boot", "sandal", "heel", "slipper"),
    "jacket": ("coat", "blazer"),
    "food": ("pizza", "sandwich", "cake", "donut", "doughnut", "bread", "fruit", "vegetable",
             "meat", "cheese", "egg", "salad", "dessert", "soup", "rice", "pasta", "burger",
             "hamburger", "hot dog", "meal", "snack", "cookie", "pie", "sausage"),
    "fruit": ("apple", "banana", "orange", "lemon", "strawberry", "pear", "peach", "pineapple",
              "watermelon", "melon", "kiwi", "lime", "cherry", "grape", "mango", "berry"),
    "vegetable": ("broccoli", "carrot", "tomato", "onion", "lettuce", "pepper", "potato",
                  "cucumber", "celery", "cauliflower", "spinach", "cabbage", "zucchini"),
    "dessert": ("cake", "donut", "doughnut", "cookie", "pie", "ice cream", "cupcake"),
    "plant": ("tree", "bush", "flower", "grass", "shrub", "palm", "weed", "fern", "cactus",
              "vine"),
    "flower": ("rose", "tulip", "daisy", "sunflower", "lily", "orchid"),
    "tree": ("palm", "pine", "oak"),
    "container": ("bottle", "cup", "bowl", "jar", "box", "basket", "bag", "can", "glass", "mug",
                  "vase", "bucket", "pot", "tray", "crate", "bin"),
    "cup": ("mug", "teacup"),
    "bag": ("backpack", "purse", "handbag", "suitcase", "luggage", "pouch"),
    "device": ("computer", "laptop", "phone", "cellphone", "monitor", "tv", "television",
               "screen", "keyboard", "remote", "camera", "tablet"),
    "computer": ("laptop", "desktop", "tablet"),
    "phone": ("cellphone", "smartphone", "telephone"),
    "screen": ("monitor", "tv", "television", "display"),
    "building": ("house", "church", "tower", "skyscraper", "barn", "shed", "hotel", "store",
                 "shop", "restaurant", "station", "castle", "cabin", "hut"),
    "utensil": ("fork", "knife", "spoon", "spatula", "ladle", "chopstick"),
    "toy": ("teddy bear", "doll", "kite", "ball", "frisbee"),
    "dish": ("plate", "bowl", "saucer", "platter"),
    "sign": ("signboard", "billboard", "poster"),
}
# fmt: on


# ---------------------------------------------------------------------------------------------
# Name filters (GQA)


def is_plural(name: str) -> bool:
    """Whether a name reads as plural: its last word ends in "s", but not in "ss", and is not a
    known singular such as "bus" or "lens" (SINGULAR_S). A rule, not a lemmatiser."""
    words = _normalise(name).split()
    if not words:
        return False
    last = words[-1]
    return last.endswith("s") and not last.endswith("ss") and last not in SINGULAR_S


def _ancestors() -> dict[str, frozenset[str]]:
    parents: dict[str, set[str]] = {}
    for parent, children in HYPERNYMS.items():
        for child in children:
            if child != parent:
                parents.setdefault(child, set()).add(parent)
    closure: dict[str, frozenset[str]] = {}

    def walk(word: str, seen: frozenset[str]) -> frozenset[str]:
        if word in closure:
            return closure[word]
        found: set[str] = set()
        for p in parents.get(word, ()):
            if p not in seen:
                found |= {p} | walk(p, seen | {word})
        closure[word] = frozenset(found)
        return closure[word]

    for word in list(parents):
        walk(word, frozenset())
    return closure


_ANCESTORS = _ancestors()


def _kinds(name: str) -> set[str]:
    """The name and its hypernyms in HYPERNYMS; an unlisted compound adds its head noun's."""
    name = _normalise(name)
    if name in _ANCESTORS or name in HYPERNYMS or " " not in name:
        return {name} | _ANCESTORS.get(name, frozenset())
    head = name.split()[-1]
    return {name, head} | _ANCESTORS.get(head, frozenset())


def is_hypernym_pair(a: str, b: str) -> bool:
    """Whether one name is a kind of the other ("dog"/"animal", "coffee table"/"table")."""
    a, b = _normalise(a), _normalise(b)
    if a == b:
        return False  # the same-name filter's business
    return a in _kinds(b) or b in _kinds(a)


# ---------------------------------------------------------------------------------------------
# GQA


@dataclass(frozen=True)
class _GqaPair:
    image_id: str
    subject_id: str
    object_id: str
    subject: str
    object: str
    relation: str
    subject_box: tuple[float, float, float, float]
    object_box: tuple[float, float, float, float]


def _number(value, where: str) -> float:
    """A scene-graph number: a JSON number or a string of one ("12", "3.5"), finite; anything
    else is refused naming ``where`` (the file, image, object and field)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        v = float(value)
    elif isinstance(value, str):
        try:
            v = float(value.strip())
        except ValueError:
            v = math.nan
    else:
        v = math.nan
    if not math.isfinite(v):
        raise SourceError(f"{where} is {value!r}, not a number: fix or delete that entry of the "
                          f"file, or download the scene graphs again from {GQA_DOWNLOAD}")
    return v


def _gqa_box(obj: dict, width: float, height: float, where: str = "GQA object"
             ) -> tuple[float, float, float, float]:
    """GQA's (x, y, w, h) as (x1, y1, x2, y2), clipped to the image (GQA boxes may overshoot)."""
    x, y, w, h = (_number(obj.get(k), f"{where} field {k!r}") for k in ("x", "y", "w", "h"))
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    return x1, y1, min(max(x + w, x1), width), min(max(y + h, y1), height)


def gqa_pairs(graphs: dict, report: SourceReport, path: Path | str = "GQA scene graphs"
              ) -> list[_GqaPair]:
    """Every (subject, relation, object) of GQA scene graphs that passes the filters, in image
    and object id order; each drop counted in `report` (reasons in the module docstring). A
    graph or object of another shape, or a number that is not one, is refused naming
    ``path``, the image and the object."""
    pairs = []
    for image_id in sorted(graphs):
        graph = graphs[image_id]
        objects = graph.get("objects", {}) if isinstance(graph, dict) else None
        if not isinstance(objects, dict) or not all(
                isinstance(o, dict) and isinstance(o.get("name", ""), str)
                and isinstance(o.get("relations", []), list)
                and all(isinstance(r, dict) and isinstance(r.get("name", ""), str)
                        for r in o.get("relations", []))
                for o in objects.values()):
            raise SourceError(f"{path}: image {image_id} is not a GQA scene graph (a mapping "
                              "with objects {id: {name, x, y, w, h, relations}}): download the "
                              f"scene graphs again from {GQA_DOWNLOAD}")
        width, height = (_number(graph.get(k, 0), f"{path}: image {image_id} field {k!r}")
                         for k in ("width", "height"))
        names = {oid: _normalise(o.get("name", "")) for oid, o in objects.items()}
        instances = Counter(names.values())
        seen: set[frozenset[str]] = set()
        for sid in sorted(objects):
            for rel in objects[sid].get("relations", []):
                relation = GQA_RELATIONS.get(_normalise(rel.get("name", "")))
                oid = str(rel.get("object"))
                reason = None
                if relation is None:
                    reason = "non-directional relation"
                elif oid not in objects:
                    reason = "dangling relation"
                elif frozenset((sid, oid)) in seen or sid == oid:
                    reason = "repeated pair"
                if reason is None:
                    seen.add(frozenset((sid, oid)))
                    a, b = names[sid], names[oid]
                    if not a or not b:
                        reason = "missing name"
                    elif is_plural(a) or is_plural(b):
                        reason = "plural name"
                    elif a == b:
                        reason = "same name"
                    elif instances[a] > 1 or instances[b] > 1:
                        reason = "several instances"
                    elif is_hypernym_pair(a, b):
                        reason = "hypernym pair"
                if reason is None:
                    box_a, box_b = (_gqa_box(objects[i], width, height,
                                             f"{path}: image {image_id} object {i}")
                                    for i in (sid, oid))
                    if any(box[2] <= box[0] or box[3] <= box[1] for box in (box_a, box_b)):
                        reason = "empty box"
                    elif relation not in geneval_relations(box_a, box_b):
                        reason = "relation disagrees with boxes"
                if reason is not None:
                    report.dropped[reason] += 1
                    continue
                pairs.append(
                    _GqaPair(str(image_id), sid, oid, a, b, relation, box_a, box_b)
                )
    return pairs


def _gqa_missing(what: str, root: Path) -> SourceError:
    return SourceError(
        f"{what} not found in {root}: download GQA scene graphs (and images) from "
        f"{GQA_DOWNLOAD} and pass --gqa-root"
    )


def gqa_source(options: SourceOptions, report: SourceReport, denoiser=None
               ) -> Iterator[Sample]:
    if options.gqa_root is None:
        raise SourceError(
            f"the gqa source needs --gqa-root: a folder with images/, train_sceneGraphs.json and "
            f"val_sceneGraphs.json from {GQA_DOWNLOAD}"
        )
    root = Path(options.gqa_root).expanduser()
    if not root.is_dir():
        raise SourceError(f"--gqa-root {root} is not a folder: download GQA from {GQA_DOWNLOAD}")
    train, val, test = per_relation("gqa", options)
    # GQA's train graphs feed train and val, its val graphs the test split (GQA's own test
    # images have no public scene graphs).
    files = []
    if train + val > 0:
        files.append(("train_sceneGraphs.json", ("train", "val")))
    if test > 0:
        files.append(("val_sceneGraphs.json", ("test",)))
    for name, _ in files:
        if not (root / name).is_file():
            raise _gqa_missing(name, root)
    if files and not (root / "images").is_dir():
        raise _gqa_missing("the images/ folder", root)
    return _gqa_samples(root, files, (train, val, test), options.seed, report)


def _gqa_samples(root: Path, files, counts, seed: int, report: SourceReport
                 ) -> Iterator[Sample]:
    quota = _Quota(counts)
    val_share = counts[1] / (counts[0] + counts[1]) if counts[0] + counts[1] else 0.0
    for name, splits in files:
        path = root / name
        try:
            with open(path, encoding="utf-8") as f:
                graphs = json.load(f)
        except (OSError, ValueError) as err:
            raise SourceError(
                f"cannot read {path} as GQA scene graphs ({err}): download it again from "
                f"{GQA_DOWNLOAD}"
            ) from err
        if not isinstance(graphs, dict):
            raise SourceError(f"{path} is not GQA scene graphs ({{image_id: graph}} expected)")
        pairs = gqa_pairs(graphs, report, path)
        del graphs  # the train graphs are large; keep only the pairs
        ranked = sorted(
            pairs, key=lambda p: _unit(seed, "rank", p.image_id, p.subject_id, p.object_id)
        )
        for p in ranked:
            if splits == ("test",):
                split = "test"
            else:  # by image, so train and val never share one
                split = "val" if _unit(seed, "split", p.image_id) < val_share else "train"
            if not quota.open(split, p.relation):
                continue
            image = root / "images" / f"{p.image_id}.jpg"
            if not image.is_file():
                report.dropped["image file missing"] += 1
                continue
            quota.take(split, p.relation)
            yield report.keep(
                Sample(
                    "gqa", f"gqa:{p.image_id}:{p.subject_id}-{p.object_id}", p.subject,
                    p.object, p.relation, p.subject_box, p.object_box, split,
                    image_path=str(image),
                )
            )
            if all(not quota.open(s, r) for s in splits for r in RELATIONS):
                break
        quota.report_short(report, splits)

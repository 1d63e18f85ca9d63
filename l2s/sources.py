"""Where inversion data comes from: GQA, a folder of annotated images, toy scenes,
generated-and-verified images.

Every source yields `Sample`s: an image (a file read lazily, or an array in memory), a subject
and an object with their boxes, the TRUE relation of the subject to the object (one of
`l2s.relations.RELATIONS`) and a split. `iter_samples(source, options, report)` is the one entry
point; the order is fixed by `options.seed`, and `source_id` names a sample the same way on every
run, so an interrupted run can skip what it already finished. Boxes are (x1, y1, x2, y2) in
pixels of the image, y pointing down; "agrees with the boxes" always means GenEval's rule
(`l2s.relations.geneval_relations`) holds for the stated relation.

Sources
-------
gqa
    GQA scene graphs (method.md section 2), from `--gqa-root` holding `images/{image_id}.jpg`,
    `train_sceneGraphs.json` and `val_sceneGraphs.json` as GQA ships them. GQA's train graphs
    give the train and val splits (images split by a seeded hash, so both splits never share an
    image); GQA's val graphs give the test split, since GQA's test images have no scene graphs.
    Kept relations: "to the left of", "on the left of", "left of" (and the same for right),
    "above", "below": the four the paper used plus GQA's rarer left/right wordings. "on top of",
    "under", "beneath" are left out: in GQA they mostly mean support or occlusion (a hat on top
    of a head), where the boxes overlap. Filters, each counted in the report under its name:
    "non-directional relation", "dangling relation" (the target object is not in the graph),
    "repeated pair" (GQA states most pairs both ways, "A left of B" and "B right of A": each
    unordered pair gives one sample, the statement whose subject id sorts first),
    "plural name" (see `is_plural`), "same name", "several instances" (a name that occurs more
    than once in the image), "hypernym pair" (see `is_hypernym_pair`; a built-in table stands in
    for WordNet), "empty box", "relation disagrees with boxes", and, while sampling,
    "image file missing". GQA's train graphs file is read whole (a few GB of memory); only the
    pairs that pass the filters are kept while sampling.
folder
    Any folder with the images and an `annotations.jsonl`, one JSON object per line:

        {"image": "photos/0001.jpg", "subject": "dog", "object": "cat",
         "relation": "to the left of",
         "subject_box": [12, 40, 110, 160], "object_box": [140, 52, 230, 170],
         "split": "train"}

    "image" is relative to the folder (or absolute). "subject_box" and "object_box" are
    required: [x1, y1, x2, y2] in pixels, y down. "relation" is optional and may be any phrasing
    `l2s.relations.canonical_relation` accepts ("left of", "on the right of", "under", ...);
    when given, a line whose boxes disagree is dropped ("relation disagrees with boxes"); when
    absent, the relation is read from the boxes (the stronger axis when two hold; dropped as
    "no relation holds" when none does). "next to" and its phrasings are dropped as
    "non-directional relation". "split" is optional ("train", "val" or "test"); without it an
    image goes to train/val/test with odds 80/10/10 by a seeded hash of its path, so all lines
    of one image share a split. Blank lines are skipped; any other malformed line stops the run
    with an error naming its line number. By default every line is used, in file order; with
    `per_relation` set, at most that many per relation and split, chosen in seeded order.
shapes
    Toy scenes (`l2s.toy.scenes.random_scene`) of exactly two shapes, scene i seeded by
    (seed, i); the relation is the one GenEval's rule gives for the first shape relative to the
    second (the stronger axis when two hold); scenes where none holds are dropped ("no relation
    holds"). Images are kept in memory.
generated
    Generate and verify: prompts "a A REL a B" over the model's known toy shapes, images from
    `l2s.engine.sampling.sample`, then the toy detector; an image is kept when both shapes are
    found, apart ("objects touch" otherwise), and their detected boxes satisfy REL ("object not
    detected", "relation not verified" otherwise). Boxes are the detected ones. Only the toy
    model has an offline detector, so other models are refused.

Splits fill in proportion: a kept shapes or generated sample goes to the split of its relation
that is least full, so a source that runs dry still has all three splits. A quota a source could
not fill is counted in `SourceReport.short`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2s.engine.registry import generation_defaults
from l2s.engine.sampling import sample, seeded_latents, to_uint8
from l2s.relations import RELATIONS, Triplet, canonical_relation, format_prompt, geneval_relations

SOURCES = ("gqa", "folder", "shapes", "generated")
SPLITS = ("train", "val", "test")

# Samples per relation (train, val, test) when options.per_relation is None. gqa: method.md's
# real-image counts for SD (Flux used 2000/400/200); generated: method.md's synthetic counts;
# shapes: toy scenes are free, but the toy classifier needs far fewer; folder: None = every line.
PER_RELATION: dict[str, tuple[int, int, int] | None] = {
    "gqa": (800, 200, 100),
    "folder": None,
    "shapes": (400, 50, 50),
    "generated": (800, 100, 70),
}

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


class SourceError(ValueError):
    """A data source cannot be read as asked; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image with a subject, an object and the true relation between them."""

    source: str  # "gqa" | "folder" | "shapes" | "generated"
    source_id: str  # stable and unique within the source, e.g. "gqa:2354786:1232-1233"
    subject: str
    object: str
    relation: str  # the TRUE relation of subject to object, one of RELATIONS
    subject_box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image
    object_box: tuple[float, float, float, float]
    split: str  # "train" | "val" | "test"
    image_path: str | None = None  # file read lazily by load_image, or
    image_array: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W, 3)

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"sample relation {self.relation!r} is not one of {RELATIONS}")
        if self.split not in SPLITS:
            raise ValueError(f"sample split {self.split!r} is not one of {SPLITS}")
        if (self.image_path is None) == (self.image_array is None):
            raise ValueError("a sample needs exactly one of image_path and image_array")

    def load_image(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB; SourceError naming the file when it is unreadable."""
        if self.image_array is not None:
            return self.image_array
        from PIL import Image

        try:
            with Image.open(self.image_path) as image:
                array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise SourceError(
                f"cannot read image {self.image_path} of sample {self.source_id} ({err}): "
                "replace the file with a readable JPEG or PNG, or remove the sample"
            ) from err
        return array


@dataclass
class SourceReport:
    """What one source kept, dropped and why; quality drops only, not samples over quota."""

    kept: Counter = field(default_factory=Counter)  # "split/relation" -> samples yielded
    dropped: Counter = field(default_factory=Counter)  # reason -> candidates dropped
    short: Counter = field(default_factory=Counter)  # "split/relation" -> quota left unfilled

    def keep(self, s: Sample) -> Sample:
        self.kept[f"{s.split}/{s.relation}"] += 1
        return s

    def to_dict(self) -> dict:
        return {
            "kept": dict(sorted(self.kept.items())),
            "kept_total": sum(self.kept.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "short": dict(sorted(self.short.items())),
        }


@dataclass(frozen=True)
class SourceOptions:
    """Where each source reads from and how many samples it yields."""

    gqa_root: str | None = None  # gqa: folder with images/ and {train,val}_sceneGraphs.json
    folder: str | None = None  # folder: folder with annotations.jsonl and its images
    # Samples per relation for (train, val, test); None: the source's default in PER_RELATION.
    per_relation: tuple[int, int, int] | None = None
    seed: int = 0  # fixes every choice and the order; same seed, same samples
    shapes_size: int = 32  # shapes: image side in pixels (match the model's image size)
    generated_model: str = "toy"  # generated: preset whose steps/guidance are the defaults
    generated_steps: int | None = None  # generated: sampling steps (None: the preset's)
    generated_guidance: float | None = None  # generated: CFG scale (None: the preset's)
    generated_candidates: int = 8000  # generated: most images generated per relation
    generated_batch: int = 64  # generated: images per sampling batch

    def __post_init__(self) -> None:
        if self.per_relation is not None:
            counts = tuple(self.per_relation)  # YAML gives lists
            if len(counts) != 3 or not all(isinstance(c, int) and c >= 0 for c in counts):
                raise SourceError(
                    f"per_relation must be three counts (train, val, test) >= 0, got "
                    f"{self.per_relation!r}"
                )
            object.__setattr__(self, "per_relation", tuple(int(c) for c in counts))
        if self.generated_batch < 1 or self.generated_candidates < 0:
            raise SourceError("generated_batch must be >= 1 and generated_candidates >= 0")


def per_relation(source: str, options: SourceOptions) -> tuple[int, int, int] | None:
    """(train, val, test) samples per relation for `source`; None: no cap (folder default)."""
    return options.per_relation if options.per_relation is not None else PER_RELATION[source]


def expected_samples(source: str, options: SourceOptions, limit: int | None = None
                     ) -> int | None:
    """At most how many samples `source` yields (None: unknown until read, e.g. folder)."""
    counts = per_relation(source, options)
    n = None if counts is None else sum(counts) * len(RELATIONS)
    if limit is not None:
        n = limit if n is None else min(n, limit)
    return n


def iter_samples(
    source: str, options: SourceOptions, report: SourceReport, denoiser=None
) -> Iterator[Sample]:
    """The samples of `source` in seeded order; counts go to `report` as they happen.

    Missing inputs raise SourceError here, before the first sample. `denoiser` is the generator
    of the "generated" source (the toy model) and is ignored by the others.
    """
    if source == "gqa":
        return _gqa(options, report)
    if source == "folder":
        return _folder(options, report)
    if source == "shapes":
        return _shapes(options, report)
    if source == "generated":
        return _generated(options, report, denoiser)
    raise SourceError(f"unknown data source {source!r}: use one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _unit(*parts: object) -> float:
    """A stable uniform number in [0, 1) from the parts (Python's hash() is salted per run)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _normalise(name: str) -> str:
    return " ".join(str(name).lower().split())


def _strongest(relations: set[str], box_a: Sequence[float], box_b: Sequence[float]) -> str:
    """The one relation of `relations` along the axis where the centres lie farther apart."""
    dx = abs((box_a[0] + box_a[2]) - (box_b[0] + box_b[2]))
    dy = abs((box_a[1] + box_a[3]) - (box_b[1] + box_b[3]))
    held = [r for r in RELATIONS if r in relations]
    return max(held, key=lambda r: dx if r in ("left of", "right of") else dy)


class _Quota:
    """Remaining (split, relation) quotas; `split_for` picks the least-full open split."""

    def __init__(self, counts: tuple[int, int, int]):
        self.target = dict(zip(SPLITS, counts, strict=True))
        self.filled = Counter()

    def open(self, split: str, relation: str) -> bool:
        return self.filled[split, relation] < self.target[split]

    def split_for(self, relation: str) -> str | None:
        open_splits = [s for s in SPLITS if self.open(s, relation)]
        if not open_splits:
            return None
        return min(open_splits, key=lambda s: self.filled[s, relation] / self.target[s])

    def relation_open(self, relation: str) -> bool:
        return any(self.open(s, relation) for s in SPLITS)

    def done(self) -> bool:
        return not any(self.relation_open(r) for r in RELATIONS)

    def take(self, split: str, relation: str) -> None:
        self.filled[split, relation] += 1

    def report_short(self, report: SourceReport, splits: Sequence[str] = SPLITS) -> None:
        for split in splits:
            for relation in RELATIONS:
                missing = self.target[split] - self.filled[split, relation]
                if missing > 0:
                    report.short[f"{split}/{relation}"] += missing


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


def _gqa_box(obj: dict, width: float, height: float) -> tuple[float, float, float, float]:
    """GQA's (x, y, w, h) as (x1, y1, x2, y2), clipped to the image (GQA boxes may overshoot)."""
    x, y, w, h = (float(obj[k]) for k in ("x", "y", "w", "h"))
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    return x1, y1, min(max(x + w, x1), width), min(max(y + h, y1), height)


def gqa_pairs(graphs: dict, report: SourceReport) -> list[_GqaPair]:
    """Every (subject, relation, object) of GQA scene graphs that passes the filters, in image
    and object id order; each drop counted in `report` (reasons in the module docstring)."""
    pairs = []
    for image_id in sorted(graphs):
        graph = graphs[image_id]
        objects = graph.get("objects", {})
        width, height = float(graph.get("width", 0)), float(graph.get("height", 0))
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
                    box_a = _gqa_box(objects[sid], width, height)
                    box_b = _gqa_box(objects[oid], width, height)
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


def _gqa(options: SourceOptions, report: SourceReport) -> Iterator[Sample]:
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
        pairs = gqa_pairs(graphs, report)
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


# ---------------------------------------------------------------------------------------------
# Folder


ANNOTATIONS = "annotations.jsonl"


def _line_box(value, key: str, where: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1]:
        raise SourceError(
            f"{where}: {key} must be [x1, y1, x2, y2] in pixels with x1 <= x2 and y1 <= y2, "
            f"got {value!r}"
        )
    return box


def _folder_line(line: str, where: str, report: SourceReport) -> dict | None:
    """One annotation line checked and normalised; None when dropped (counted in report)."""
    try:
        entry = json.loads(line)
    except ValueError as err:
        raise SourceError(
            f"{where}: not valid JSON ({err}); write one JSON object per line"
        ) from None
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    required = ("image", "subject", "object", "subject_box", "object_box")
    missing = [k for k in required if k not in entry]
    if missing:
        raise SourceError(
            f"{where}: missing {', '.join(missing)}; every line needs {', '.join(required)} "
            "(relation and split are optional)"
        )
    for key in ("image", "subject", "object"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise SourceError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}")
    box_a = _line_box(entry["subject_box"], "subject_box", where)
    box_b = _line_box(entry["object_box"], "object_box", where)
    split = entry.get("split")
    if split is not None and split not in SPLITS:
        raise SourceError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    held = geneval_relations(box_a, box_b)
    phrase = entry.get("relation")
    if phrase is not None:
        if not isinstance(phrase, str):
            raise SourceError(f"{where}: relation must be a string, got {phrase!r}")
        try:
            relation = canonical_relation(phrase)
        except ValueError as err:
            raise SourceError(f"{where}: {err}") from None
        if relation not in RELATIONS:
            report.dropped["non-directional relation"] += 1
            return None
        if relation not in held:
            report.dropped["relation disagrees with boxes"] += 1
            return None
    elif not held:
        report.dropped["no relation holds"] += 1
        return None
    else:
        relation = _strongest(held, box_a, box_b)
    return {
        "image": entry["image"], "subject": _normalise(entry["subject"]),
        "object": _normalise(entry["object"]), "relation": relation,
        "subject_box": box_a, "object_box": box_b, "split": split,
    }


def _folder(options: SourceOptions, report: SourceReport) -> Iterator[Sample]:
    if options.folder is None:
        raise SourceError(
            f"the folder source needs --folder: a folder with your images and an {ANNOTATIONS} "
            "(format in docs, or help(l2s.sources))"
        )
    folder = Path(options.folder).expanduser()
    path = folder / ANNOTATIONS
    if not path.is_file():
        raise SourceError(
            f"{ANNOTATIONS} not found in {folder}: write one JSON line per image pair, e.g. "
            '{"image": "a.jpg", "subject": "dog", "object": "cat", "relation": "left of", '
            '"subject_box": [x1, y1, x2, y2], "object_box": [x1, y1, x2, y2]}'
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read {path} ({err}): save it as UTF-8 text") from err
    entries = []  # (line number, normalised entry)
    for number, line in enumerate(lines, 1):
        if line.strip():
            entry = _folder_line(line, f"{path} line {number}", report)
            if entry is not None:
                entries.append((number, entry))
    return _folder_samples(folder, entries, per_relation("folder", options), options.seed,
                           report)


def _folder_samples(folder: Path, entries, counts, seed: int, report: SourceReport
                    ) -> Iterator[Sample]:
    def split_of(entry: dict) -> str:
        if entry["split"] is not None:
            return entry["split"]
        u = _unit(seed, "split", entry["image"])  # by image: its lines never straddle splits
        return "train" if u < 0.8 else "val" if u < 0.9 else "test"

    quota = _Quota(counts) if counts is not None else None
    if quota is not None:
        entries = sorted(entries, key=lambda ne: _unit(seed, "rank", ne[0], ne[1]["image"]))
    for number, e in entries:
        split = split_of(e)
        if quota is not None:
            if not quota.open(split, e["relation"]):
                continue
            quota.take(split, e["relation"])
        yield report.keep(
            Sample(
                "folder", f"folder:{number}:{e['image']}", e["subject"], e["object"],
                e["relation"], e["subject_box"], e["object_box"], split,
                image_path=str(folder / e["image"]),
            )
        )
    if quota is not None:
        quota.report_short(report)


# ---------------------------------------------------------------------------------------------
# Toy shapes


def _shapes(options: SourceOptions, report: SourceReport) -> Iterator[Sample]:
    from l2s.toy.scenes import side_range

    try:
        side_range(options.shapes_size)
    except ValueError as err:
        raise SourceError(f"shapes_size {options.shapes_size}: {err}") from None
    return _shapes_samples(options, per_relation("shapes", options), report)


def _shapes_samples(options: SourceOptions, counts, report: SourceReport) -> Iterator[Sample]:
    from l2s.toy.scenes import random_scene

    quota = _Quota(counts)
    size, seed = options.shapes_size, options.seed
    # Scenes of two shapes relate under GenEval's rule most of the time; the cap only stops a
    # pathological configuration from looping forever.
    limit = 50 * sum(counts) * len(RELATIONS) + 1000
    for i in range(limit):
        if quota.done():
            break
        scene = random_scene(np.random.default_rng([seed, i]), size=size, n_objects=2)
        a, b = scene.objects
        held = geneval_relations(a.box, b.box)
        if not held:
            report.dropped["no relation holds"] += 1
            continue
        relation = _strongest(held, a.box, b.box)
        split = quota.split_for(relation)
        if split is None:
            continue
        quota.take(split, relation)
        yield report.keep(
            Sample(
                "shapes", f"shapes:{size}:{seed}:{i}", a.category, b.category, relation,
                tuple(float(v) for v in a.box), tuple(float(v) for v in b.box), split,
                image_array=scene.image,
            )
        )
    quota.report_short(report)


# ---------------------------------------------------------------------------------------------
# Generated and verified


def _generated(options: SourceOptions, report: SourceReport, denoiser) -> Iterator[Sample]:
    from l2s.toy.scenes import CATEGORY_NAMES

    if denoiser is None:
        raise SourceError(
            "the generated source needs a model to generate with: load one "
            "(l2s.engine.loading.load_backbone) and pass it as denoiser, or use --source shapes"
        )
    known = getattr(denoiser, "known_objects", None)
    if known is None or not set(known) <= set(CATEGORY_NAMES):
        raise SourceError(
            "the generated source needs a detector; only the toy model has one offline: "
            "use --model toy, or --source gqa / --source folder for real images"
        )
    categories = [c for c in CATEGORY_NAMES if c in known]
    if len(categories) < 2:
        raise SourceError(f"the generated source needs two known shapes, the model has {known}")
    return _generated_samples(options, per_relation("generated", options), report, denoiser,
                              categories)


def candidate_triplet(seed: int, index: int, categories: Sequence[str]) -> Triplet:
    """The prompt triplet of generated candidate `index`: relations take turns, the two shapes
    are a seeded draw, so a candidate is the same whatever the batch size or quota."""
    relation = RELATIONS[index % len(RELATIONS)]
    rng = np.random.default_rng([seed, index])
    a, b = rng.choice(len(categories), size=2, replace=False)
    return Triplet(categories[int(a)], relation, categories[int(b)])


def _verify(image: np.ndarray, t: Triplet) -> tuple[str | None, tuple | None, tuple | None]:
    """(drop reason or None, subject box, object box) under the toy detector and GenEval's rule."""
    from l2s.toy.detector import detect, objects_touch, oversized

    found = detect(image, categories=[t.subject, t.object])
    a, b = found.get(t.subject), found.get(t.object)
    if a is None or b is None:
        return "object not detected", None, None
    size = max(image.shape[:2])
    if objects_touch(a, b) or oversized(a, size) or oversized(b, size):
        return "objects touch", None, None
    if t.relation not in geneval_relations(a.box, b.box):
        return "relation not verified", None, None
    return None, tuple(float(v) for v in a.box), tuple(float(v) for v in b.box)


def _generated_samples(options: SourceOptions, counts, report: SourceReport, denoiser,
                       categories: list[str]) -> Iterator[Sample]:
    quota = _Quota(counts)
    steps, guidance = generation_defaults(
        options.generated_model, options.generated_steps, options.generated_guidance
    )
    seed = options.seed
    tried = Counter()  # relation -> candidates generated
    index = 0
    # Candidate i asks for RELATIONS[i % 4]; a relation stops drawing candidates once its quota
    # is full or its budget spent, so ids stay tied to one prompt and one noise.
    while not quota.done():
        batch: list[tuple[int, Triplet]] = []
        while len(batch) < options.generated_batch:
            live = [r for r in RELATIONS
                    if quota.relation_open(r) and tried[r] < options.generated_candidates]
            if not live:
                break
            relation = RELATIONS[index % len(RELATIONS)]
            if relation in live:
                batch.append((index, candidate_triplet(seed, index, categories)))
                tried[relation] += 1
            index += 1
        if not batch:
            break
        prompts = [format_prompt([t], style="plain") for _, t in batch]
        latents = seeded_latents(denoiser, [seed * 10_000_019 + i for i, _ in batch])
        images = to_uint8(sample(denoiser, prompts, steps=steps, guidance=guidance,
                                 latents=latents))
        for (i, t), image in zip(batch, images, strict=True):
            reason, box_a, box_b = _verify(image, t)
            if reason is not None:
                report.dropped[reason] += 1
                continue
            split = quota.split_for(t.relation)
            if split is None:  # the batch overshot this relation's quota
                continue
            quota.take(split, t.relation)
            yield report.keep(
                Sample(
                    "generated", f"generated:{seed}:{i}", t.subject, t.object, t.relation,
                    box_a, box_b, split, image_array=image,
                )
            )
    quota.report_short(report)

"""Where inversion data comes from: GQA, a folder of annotated images, and the sources a
family's world or another package registers.

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
    GQA scene graphs (the paper's real images), from `--gqa-root` holding `images/{image_id}.jpg`,
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
(others)
    A family's world registers its own, e.g. the toy's "shapes" and "generated"
    (``l2s.toy.sources``); packages list theirs under the ``l2s.sources`` entry-point group.

Splits fill in proportion: a kept sample of a generating source goes to the split of its relation
that is least full, so a source that runs dry still has all three splits. A quota a source could
not fill is counted in `SourceReport.short`.
"""

from l2s.inversion.sources.base import (
    SOURCE_REGISTRY,
    SPLITS,
    Sample,
    Source,
    SourceError,
    SourceOptions,
    SourceReport,
    expected_samples,
    iter_samples,
    per_relation,
    register_source,
    sources,
)
from l2s.inversion.sources.gqa import gqa_pairs, is_hypernym_pair, is_plural

__all__ = [
    "SOURCES", "SOURCE_REGISTRY", "SPLITS", "Sample", "Source", "SourceError", "SourceOptions",
    "SourceReport", "expected_samples", "gqa_pairs", "is_hypernym_pair", "is_plural",
    "iter_samples", "per_relation", "register_source", "sources",
]


def __getattr__(name: str):
    if name == "SOURCES":  # the names, once every source has registered
        return sources()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

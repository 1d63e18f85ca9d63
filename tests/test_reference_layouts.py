"""Published-classifier layouts are declared by families (ReferenceLayout) and read from the
registry: layout function, text length and checkpoint-shape test."""

from types import SimpleNamespace

import pytest

from l2s.classifier.importer import ImportRefused, _check_shape
from l2s.classifier.layout import LayoutError, MapLayout, published_presets, reference_for
from l2s.engine import registry
from l2s.engine.backbone import CrossAttnLayer
from l2s.engine.registry import Family, ReferenceLayout, reference_layouts


def _dots_family(monkeypatch) -> ReferenceLayout:
    ref = ReferenceLayout("dots", "Dots", lambda layers: MapLayout("dots", (1, 0)), text_len=99,
                          shaped=lambda arch: arch.extractor_layers == 7,
                          shape="extractor 7 layers", presets=("dots-1",))
    registry.families()  # the built-in families first
    monkeypatch.setitem(registry._FAMILIES, "dots",
                        Family("dots", lambda req: None, reference_layout=ref))
    return ref


def test_the_builtin_families_declare_their_published_layouts():
    """Catches a family's declaration lost on the way to the registry (SD: its own text
    length; Flux: 512 T5 keys and its shape test)."""
    refs = reference_layouts()
    assert refs["unet"].text_len is None and refs["unet"].shaped is None
    assert refs["flux"].text_len == 512
    flux_sized = SimpleNamespace(extractor_layers=4, extractor_ff=512)
    assert refs["flux"].shaped(flux_sized) and not refs["flux"].shaped(
        SimpleNamespace(extractor_layers=2, extractor_ff=512))
    phrase = published_presets().replace(" or ", ", ").split(", ")
    assert sorted(phrase) == ["flux-dev", "flux-schnell", "sd1.4", "sd2.1-base"]


def test_a_new_familys_layout_is_read_from_its_declaration(monkeypatch):
    """Catches core tables of layouts (a published SD3 classifier would need core edits)."""
    ref = _dots_family(monkeypatch)
    den = SimpleNamespace(name="dots-1", reference_layout="dots",
                          cross_attention_layers=lambda: [CrossAttnLayer("a", 2, (4, 4))])
    assert reference_for(den) is ref and ref.layout([]).order == (1, 0)
    assert published_presets().endswith(" or dots-1")
    with pytest.raises(LayoutError, match="declares no reference map layout.*dots-1"):
        reference_for(SimpleNamespace(name="x", reference_layout=None))
    # Its shape test: a dots-sized checkpoint is refused on a Flux backbone, naming its family;
    # an SD-sized one on a dots backbone names the SD presets.
    dots_sized = SimpleNamespace(extractor_layers=7, extractor_ff=128)
    with pytest.raises(ImportRefused, match="Dots classifiers need the dots family.*dots-1"):
        _check_shape(reference_layouts()["flux"], dots_sized, "flux-dev")
    with pytest.raises(ImportRefused, match="SD classifiers' shape, not the Dots one.*sd1.4"):
        _check_shape(ref, SimpleNamespace(extractor_layers=2, extractor_ff=128), "dots-1")
    _check_shape(ref, dots_sized, "dots-1")  # its own: accepted

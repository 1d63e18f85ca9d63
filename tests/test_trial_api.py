"""The Python API given values of the wrong type, found by a hostile-user trial
(docs/reliability.md): each is an L2SError naming the field, when the config is built or the
job called, never an AttributeError or TypeError from deep inside."""

import pytest

import l2s
from l2s.errors import L2SError

PROMPT = "a circle to the left of a square"


@pytest.mark.parametrize("build,message", [
    # were: a true string turned verification on; 1 taken as a flag
    (lambda: l2s.SteerConfig(PROMPT, verify="no"), "--verify must be True or False"),
    (lambda: l2s.SteerConfig(PROMPT, save_attention=1), "--save-attention must be True or False"),
    (lambda: l2s.SpeedConfig(end_to_end="no"), "--end-to-end must be True or False"),
    (lambda: l2s.SpeedConfig(channels_last="yes"), "--channels-last must be True or False"),
    # were: AttributeError ('NoneType' object has no attribute 'partition')
    (lambda: l2s.BenchConfig(methods=("plain", None)), "--method takes names"),
    (lambda: l2s.BenchConfig(color_model=None), "--color-model must be a non-empty text"),
    # were: accepted, then a TypeError from torch.device
    (lambda: l2s.InvertConfig(device=5), "--device must be a non-empty text"),
    (lambda: l2s.InvertConfig(dtype=5), "--dtype must be a non-empty text"),
    (lambda: l2s.DistillConfig(device=5), "--device must be a non-empty text"),
    # was: TypeError ('<' not supported between 'int' and 'NoneType')
    (lambda: l2s.TrainConfig(val_fraction=None), "--val-fraction must be a number, got None"),
    # were: TypeError ('int' object is not iterable), [5] / [None] taken as names
    (lambda: l2s.DistillConfig(hold_out=5), "--hold-out takes names"),
    (lambda: l2s.DistillConfig(targets=5), "--targets takes names"),
    (lambda: l2s.DistillConfig(targets=[5]), "--targets takes names"),
    (lambda: l2s.DistillConfig(hold_out=[None]), "--hold-out takes names"),
    (lambda: l2s.DistillConfig.from_options([1, 2]), "must be a mapping"),
])
def test_configs_refuse_values_of_the_wrong_type_when_built(build, message):
    with pytest.raises(L2SError) as e:
        build()
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("job,config", [
    ("steer", {"prompt": PROMPT}), ("steer", None), ("invert", "shapes"), ("train", None),
    ("benchmark", {}), ("speed", 5), ("distillation", None),
])
def test_a_job_called_with_something_else_than_its_config_says_so(job, config):
    """Catches `steer({"prompt": ...})` / `steer(None)`: an AttributeError ('dict' object has
    no attribute 'prompt') from deep inside."""
    fn = getattr(l2s, job)
    args = (config, None) if job == "distillation" else (config,)
    with pytest.raises(L2SError, match=rf"{job}\(\) takes a \w+Config, got "):
        fn(*args)


def test_load_backbone_and_parse_refuse_what_is_not_text():
    """Catches load_backbone(None) / parse(5): a TypeError from pathlib or re."""
    for bad in (None, 5, "", "  "):
        with pytest.raises(L2SError, match="--model must be a preset name"):
            l2s.load_backbone(bad)
    for bad in (None, 5, b"a circle"):
        with pytest.raises(L2SError, match="the prompt must be text"):
            l2s.parse(bad)
    assert l2s.parse(PROMPT)[0].relation


def test_an_empty_annotations_file_is_refused(tmp_path):
    """Catches a folder source whose annotations.jsonl is empty: "wrote 0 entries", exit 0."""
    from l2s import InvertConfig, invert

    (tmp_path / "annotations.jsonl").write_text("\n\n")
    with pytest.raises(L2SError, match="annotations.jsonl is empty: write one JSON line"):
        invert(InvertConfig(data=("folder",), folder=str(tmp_path), limit=2,
                            cache_dir=str(tmp_path / "cache")))

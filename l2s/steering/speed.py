"""Speed benchmark: plain vs steered, and our steering iteration vs a reference-style one.

Everything is measured side by side in one run on one backbone, batch 1, after a warm-up:

* ``plain_step``: one classifier-free guided DDIM step (two branches, no gradient);
* ``ours_iteration``: one steering iteration as ``l2s steer`` runs it (conditional forward with
  the latent requiring grad, maps of the two objects' tokens in the recorded layers only, every
  other attention layer on PyTorch's fused SDPA kernel; loss; gradient to the latent; update);
* ``ours_eager_iteration`` (with ``--compile`` only): ``ours_iteration`` run eagerly, so the
  compiled / eager ratio comes from one run (the compilation is the compiled unit's warm-up,
  ``warmup_ms``, outside its median);
* ``reference_iteration``: the same iteration done the common attention-store way: explicit
  softmax attention in every layer (self-attention too) and every token's map of every
  cross-attention layer kept in the graph, the loss then reading the two objects from it;
* ops: the ATen operations one call of each unit dispatches (``engine.timing.OpCounter``):
  kernels (launches on a GPU, counted the same on a CPU) and host reads (GPU syncs);
* end to end: a plain generation, and steered generations at the worst case (every steered
  step runs all ``iterations``, the early exit disabled) and at one iteration per steered step.

Ratios (steered / plain, reference / ours) and peak memory come out of the same run, so they do
not depend on which machine ran it. Times use CUDA events on a GPU and perf_counter on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from l2s.config import (
    check_config,
    check_flag,
    check_integer,
    check_text,
    check_writable_file,
)
from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import guided_prediction, sample, seeded_latents
from l2s.engine.timing import Clock
from l2s.errors import ConfigError, L2SError
from l2s.inversion.cache import atomic_write_text
from l2s.relations import parse
from l2s.steering.loop import RelationPlan, Steerer, steer_latents
from l2s.steering.losses import RelationLoss
from l2s.steering.options import SteerOptions


@dataclass(frozen=True)
class SpeedConfig:
    """One `l2s speed` run."""

    model: str = "toy"  # preset, hub id or folder
    prompt: str | None = None  # None: a two-object prompt the model knows
    random_weights: bool = False  # SD presets: exact architecture, random weights (no download)
    image_size: int | None = None  # pixels (None: the model's default)
    device: str | None = None  # None: $L2S_DEVICE, else CUDA if available
    dtype: str | None = None  # None: fp16 on CUDA, fp32 on CPU
    # Sampling and steering; iterations: run on every steered step (the worst case, the early
    # exit disabled), at least 1.
    options: SteerOptions = field(default_factory=SteerOptions)
    repeats: int = 5  # timed repetitions of each unit, after one warm-up
    end_to_end: bool = True  # also time whole generations (plain, worst case, 1 iteration)
    classifier: str | None = None  # None: the model's classifier, else a random one (timing)
    lora: str | None = None  # LoRA folder merged into the network (a preset name: its own)
    channels_last: bool = False  # the attention model in channels_last (NHWC) memory format
    truncate: bool = True  # steering forwards stop after the last recorded layer
    out: str | None = None  # also write the report JSON to this file
    # build and time the model even when its weights do not fit the device's free memory
    force: bool = False

    def __post_init__(self) -> None:
        check_text("--model", self.model)
        check_text("--prompt", self.prompt, optional=True)
        check_integer("--image-size", self.image_size, 1)
        check_text("--device", self.device, optional=True)
        check_text("--dtype", self.dtype, optional=True)
        if not isinstance(self.options, SteerOptions):
            raise ConfigError(f"options must be a SteerOptions, got {self.options!r}")
        check_integer("--iterations", self.options.iterations, 1)
        # 10^20 timed forever without a word; a thousand repeats settle any mean
        check_integer("--repeats", self.repeats, 1, optional=False, high=1000)
        check_text("--classifier", self.classifier, optional=True, path=True)
        check_text("--lora", self.lora, optional=True, path=True)
        check_text("--out", self.out, optional=True, path=True)
        for name in ("random_weights", "end_to_end", "channels_last", "truncate"):
            check_flag(f"--{name.replace('_', '-')}", getattr(self, name))

    def to_json(self) -> dict:
        """The config as flat {option: value}: the report's "config"."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "options"}
        return {**d, **self.options.to_json()}


@dataclass
class SpeedResult:
    """What `l2s speed` measured (``to_json()``: the report, as written to ``config.out``)."""

    model: str  # the backbone's name
    device: str  # the GPU's name, or the CPU with its thread count
    dtype: str  # the attention model's parameters
    image_size: list[int]  # (H, W) pixels
    text_len: int | None  # text keys each map is softmaxed over
    prompt: str
    loss: str  # the classifier card steered with, or "random (timing only)"
    steps: int
    steered_steps: int  # a count (SteerSettings.steered_count)
    iterations: int  # per steered step in the worst case
    repeats: int  # timed repetitions of each unit
    config: dict  # the SpeedConfig, as given
    # unit -> ms (median), forward_ms, backward_ms, update_ms, peak_mb, ops (kernels, host reads)
    units: dict[str, dict]
    ratios: dict  # steered / plain, reference / ours, compiled / eager, memory
    end_to_end: dict | None = None  # whole generations (None: --units-only)
    path: Path | None = None  # where the report was written (None: nowhere)

    def to_json(self) -> dict:
        doc = {k: v for k, v in asdict(self).items() if k != "path"}
        if self.end_to_end is None:  # the report has no key for what was not measured
            del doc["end_to_end"]
        return doc


class SpeedRefused(L2SError):
    """The model would not fit the device: refused before it is built (``--force`` runs it)."""


@dataclass(frozen=True)
class SpeedEstimate:
    """What a run will take, counted before the model is built: its weights' bytes and one
    forward's FLOPs on the preset's meta-device architecture, the device's free memory and
    the rate it multiplies matrices. None where unknown (a hub id or folder is not counted)."""

    device: torch.device
    dtype: str  # the networks' dtype
    weight_bytes: int | None
    free_bytes: int | None  # free GPU memory, or the system's available memory
    forwards: int | None  # forward-equivalents the run does (a backward counted as 2)
    forward_flops: int | None  # one batch-1 forward of the attention model
    flops_per_second: float | None  # square matrix products on the device: a ceiling

    @property
    def fits(self) -> bool:
        """False only when the weights alone exceed the free memory."""
        return self.weight_bytes is None or self.free_bytes is None or \
            self.weight_bytes <= self.free_bytes

    @property
    def seconds(self) -> float | None:
        """A floor on the run's time: its FLOPs at the matrix-product rate."""
        if not (self.forwards and self.forward_flops and self.flops_per_second):
            return None
        return self.forwards * self.forward_flops / self.flops_per_second

    def describe(self) -> str:
        gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
        parts = [f"weights {gb(self.weight_bytes)} ({self.dtype})"
                 if self.weight_bytes is not None else "weights not counted (not a preset)"]
        if self.free_bytes is not None:
            parts.append(f"{gb(self.free_bytes)} free on {self.device.type}")
        if self.seconds is not None:
            parts.append(f"~{self.forwards} forwards of {self.forward_flops / 1e12:.2g} TFLOP at "
                         f"{self.flops_per_second / 1e9:.3g} GFLOP/s (this {self.device.type}'s "
                         f"matrix products): at least {_duration(self.seconds)}")
        return "estimate: " + "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate(config: SpeedConfig) -> SpeedEstimate:
    """What ``config``'s run will take, without building its model: a preset with a built-in
    architecture is counted on the meta device; a hub id, a folder or a shipped toy only get
    the device's free memory."""
    from l2s.engine import footprint
    from l2s.engine.loading import load_architecture, resolve_device, resolve_dtype
    from l2s.engine.registry import presets

    device = resolve_device(config.device)
    preset = presets().get(config.model)
    free = footprint.free_memory(device)
    if preset is None or not preset.configs:
        return SpeedEstimate(device, str(resolve_dtype(config.dtype, device)).replace(
            "torch.", ""), None, free, None, None, None)
    den = load_architecture(config.model, dtype=resolve_dtype(config.dtype, device),
                            image_size=config.image_size)
    dtype = next(den.attention_model.parameters()).dtype  # a family may change it (bf16)
    settings = config.options.resolve(config.model)
    branches = 2 if den.guidance_mode == "cfg" else 1
    steered, runs = settings.steered_count(), config.repeats + 1  # + the warm-up
    forwards = runs * (branches + 3 * (3 if settings.compile != "off" else 2))
    if config.end_to_end:  # plain, worst case, one iteration per steered step
        forwards += 3 * settings.steps * branches + 3 * steered * (settings.iterations + 1)
    return SpeedEstimate(device, str(dtype).replace("torch.", ""),
                         footprint.weight_bytes(footprint.networks(den)), free, forwards,
                         footprint.forward_flops(den), footprint.matmul_rate(device, dtype))


def check_estimate(config: SpeedConfig, est: SpeedEstimate) -> None:
    """Refuse, naming ``--force``, a model whose weights exceed the device's free memory."""
    if est.fits or config.force:
        return
    raise SpeedRefused(
        f"--model {config.model} needs {est.weight_bytes / 1e9:.1f} GB for its weights "
        f"({est.dtype}) and {est.device.type} has {est.free_bytes / 1e9:.1f} GB free: use a "
        "machine with more memory (a GPU), a smaller --dtype, or --force to try anyway")


def cpu_warning(config: SpeedConfig, est: SpeedEstimate) -> str | None:
    """The warning that `l2s speed` of a real model on a CPU measures little of use (the
    shipped toys, CPU models, get none)."""
    from l2s.engine.registry import presets

    preset = presets().get(config.model)
    if est.device.type != "cpu" or (preset is not None and not preset.configs):
        return None
    return ("l2s speed is a GPU benchmark (CUDA-synchronised times, kernel launches): on a CPU "
            "a real model takes long and its times say little about a GPU; --units-only and "
            "--repeats 1 shorten it")


def timing_loss(denoiser: Denoiser, model: str, classifier: str | None) -> tuple[RelationLoss, str]:
    """The model's trained classifier loss, or a randomly initialised one of the same shape.

    A random classifier costs exactly what a trained one costs; the benchmark never reads its
    answers, it only disables the early exit.
    """
    from l2s.classifier.model import ClassifierConfig, RelationClassifier
    from l2s.steering.job import SteerError, build_loss
    from l2s.steering.losses import ClassifierLoss

    try:
        loss, card = build_loss("l2s", denoiser, model, classifier)
        return loss, str(card)
    except SteerError:
        if classifier is not None:
            raise
    layers = denoiser.cross_attention_layers()
    cfg = ClassifierConfig(n_maps=sum(la.heads for la in layers),
                           heads_per_layer=tuple(la.heads for la in layers))
    net = RelationClassifier(cfg).to(denoiser.device).eval().requires_grad_(False)
    return ClassifierLoss(net, cfg.relations, lambda t, step: t), "random (timing only)"


@contextlib.contextmanager
def explicit_attention(model: torch.nn.Module, processors: dict | None = None):
    """Every attention layer on an explicit-softmax processor (no fused kernel): diffusers'
    AttnProcessor, or the family's own ``processors`` (``Denoiser.reference_processors``)."""
    from diffusers.models.attention_processor import AttnProcessor

    originals = dict(model.attn_processors)
    model.set_attn_processor(processors or {k: AttnProcessor() for k in originals})
    try:
        yield
    finally:
        model.set_attn_processor(dict(originals))


def _default_prompt(denoiser: Denoiser) -> str:
    objs = denoiser.known_objects
    if objs:
        return f"a {objs[0]} to the left of a {objs[1]}"
    return "a dog to the right of a teddy bear"


def speed(config: SpeedConfig, denoiser: Denoiser | None = None, on_unit=None,
          on_note=None) -> SpeedResult:
    """Measure the units and the end-to-end generations; write the report to ``config.out``
    (checked before the timing, which an unwritable report would waste) and return it.

    Before building the model: ``estimate`` (told to ``on_note`` with, on a CPU, a warning)
    and a refusal (``SpeedRefused``) when its weights exceed the free memory, unless
    ``config.force``."""
    check_config("speed", config, SpeedConfig)
    from l2s.engine.loading import load_backbone
    from l2s.steering.job import PromptError

    if config.out:
        check_writable_file(config.out)
    if denoiser is None:
        est = estimate(config)
        if on_note is not None:
            on_note(est.describe())
        check_estimate(config, est)
        warning = cpu_warning(config, est)
        if warning and on_note is not None:
            on_note(f"warning: {warning}")
        denoiser = load_backbone(config.model, device=config.device, dtype=config.dtype,
                                 random_weights=config.random_weights,
                                 image_size=config.image_size)
    if config.lora is not None:
        from l2s.distill.lora import resolve_lora, with_lora

        denoiser = with_lora(denoiser, resolve_lora(config.lora, config.model))
    prompt = config.prompt or _default_prompt(denoiser)
    triplets = [t for t in parse(prompt) if t.steerable]
    if not triplets:
        raise PromptError(f"the prompt {prompt!r} states no steerable relation (left of, "
                          "right of, above, below): nothing to steer")
    from l2s.steering.job import check_prompt

    check_prompt(denoiser, triplets)  # what steer refuses, speed refuses too
    loss, loss_source = timing_loss(denoiser, config.model, config.classifier)
    if config.channels_last:  # cuDNN's native layout: no NCHW<->NHWC conversions per conv
        denoiser.attention_model.to(memory_format=torch.channels_last)
    base = replace(config.options.resolve(config.model), truncate_forward=config.truncate)
    # threshold < 0: a cross-entropy is never below it, so no early exit (worst case).
    worst = replace(base, threshold_start=-1.0, threshold_end=-1.0)
    one_iter = replace(worst, iterations=1)
    clock = Clock(denoiser.device)
    x = seeded_latents(denoiser, [0])
    t = denoiser.timesteps(base.steps)[0]
    cond = denoiser.encode_prompt([prompt])
    uncond = denoiser.encode_prompt([""])
    units: dict[str, dict] = {}

    def note(name: str, res: dict) -> None:
        units[name] = res
        if on_unit:
            on_unit(name, res)

    with torch.no_grad():
        note("plain_step", clock.measure(
            lambda: denoiser.step(guided_prediction(denoiser, x, t, cond, uncond, base.guidance),
                                  t, None, x), config.repeats, count_ops=True))

    def iteration(reference: bool, eager: bool = False):
        # The reference-style loop runs the whole network, eagerly, on every iteration.
        settings = replace(one_iter, truncate_forward=False) if reference else one_iter
        plan = RelationPlan.build(denoiser.tokenizer, [prompt], [triplets])
        if reference:  # every token's maps, after the objects' groups
            plan = plan.reading_every_token(cond["states"].shape[1])
        st = Steerer(denoiser, [prompt], [triplets], loss,
                     replace(settings, compile="off") if reference or eager else settings,
                     plan=plan)
        ctx = explicit_attention(denoiser.attention_model,
                                 denoiser.reference_processors()) if reference else \
            contextlib.nullcontext()
        compiled = st.settings.compile != "off"
        with ctx, st.recorder() as rec:
            # ATen ops of eager runs only: a compiled region runs fused kernels, and a dispatch
            # mode around it would send it back through the compiler.
            res = clock.measure(lambda: st.update(rec, x, t, 0), config.repeats,
                                count_ops=not compiled)
            recs = st.stats.steps[-config.repeats:]  # the timed calls only
            if not reference:  # one more update, kept: compiled and eager must agree on it
                updates.append(st.update(rec, x, t, 0) - x)
        for k in ("forward_ms", "backward_ms", "update_ms"):
            res[k] = round(statistics.median(getattr(r, k) for r in recs), 3)
        return res

    updates: list[torch.Tensor] = []  # the latent update of ours, compiled and eager

    note("ours_iteration", iteration(reference=False))
    if base.compile != "off":  # the same iteration eager, timed in the same run
        note("ours_eager_iteration", iteration(reference=False, eager=True))
    note("reference_iteration", iteration(reference=True))

    n_steered = worst.steered_count()
    report: dict = {
        "model": denoiser.name, "device": _device_name(denoiser.device),
        "dtype": str(next(denoiser.attention_model.parameters()).dtype).replace("torch.", ""),
        "image_size": list(denoiser.image_size), "text_len": denoiser.text_len,
        "prompt": prompt, "loss": loss_source,
        "steps": base.steps, "steered_steps": n_steered,  # a count (SteerSettings.steered_count)
        "iterations": base.iterations, "repeats": config.repeats,
        "config": config.to_json(), "units": units,
    }
    plain_ms, ours_ms = units["plain_step"]["ms"], units["ours_iteration"]["ms"]
    ref_ms = units["reference_iteration"]["ms"]
    n_it = n_steered * base.iterations
    report["ratios"] = {
        "ours_iteration_vs_plain_step": round(ours_ms / plain_ms, 3),
        "reference_vs_ours_iteration": round(ref_ms / ours_ms, 3),
        # Kernel launches bound a small batch on a GPU: this ratio is the same on any device
        # (counted on the eager iteration).
        "ours_iteration_vs_plain_step_kernels": round(
            units["ours_eager_iteration" if base.compile != "off" else "ours_iteration"]
            ["ops"]["kernels"] / units["plain_step"]["ops"]["kernels"], 3),
        "compiled_vs_eager_iteration": round(ours_ms / units["ours_eager_iteration"]["ms"], 3)
        if "ours_eager_iteration" in units else None,
        # How far the compiled update is from the eager one, relative to the largest eager
        # entry: rounding gives ~1e-6 in fp32; more means the compiled gradient is wrong.
        "compiled_vs_eager_update_error": _relative_error(*updates) if len(updates) == 2
        else None,
        # CPU peak memory is the process's lifetime maximum: only a GPU gives a ratio.
        "reference_vs_ours_peak_memory": round(units["reference_iteration"]["peak_mb"]
                                               / units["ours_iteration"]["peak_mb"], 3)
        if denoiser.device.type == "cuda" else None,
        # From the unit times: plain generation + n_it extra iterations.
        "estimated_worst_case_vs_plain": {
            "ours": round(1 + n_it * ours_ms / (base.steps * plain_ms), 2),
            "reference": round(1 + n_it * ref_ms / (base.steps * plain_ms), 2)},
    }
    if config.end_to_end:
        report["end_to_end"] = _end_to_end(denoiser, prompt, triplets, loss, base, worst,
                                           one_iter, clock, on_unit)
    result = SpeedResult(**report)
    if config.out:
        result.path = Path(config.out).expanduser()
        result.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(result.path, json.dumps(result.to_json(), indent=2))
    return result


run_speed = speed  # the name before the API named every job by its command


def _end_to_end(denoiser, prompt, triplets, loss, base, worst, one_iter, clock, on_unit
                ) -> dict:
    """Whole generations of one image, each timed once after the unit warm-ups."""
    x = seeded_latents(denoiser, [1])
    out = {}

    def timed(name: str, fn) -> None:
        clock.sync()
        clock.reset_peak()
        ms, result = clock.timed_call(fn)
        res = {"seconds": round(ms / 1000, 3), "peak_mb": clock.peak_mb()}
        if isinstance(result, tuple):  # steered: how many gradient iterations actually ran
            res["iterations_run"] = sum(r.iterations for r in result[1].steps)
        out[name] = res
        if on_unit:
            on_unit(name, res)

    timed("plain", lambda: sample(denoiser, [prompt], steps=base.steps,
                                  guidance=base.guidance, latents=x))
    for name, s in (("steered_worst_case", worst), ("steered_one_iteration", one_iter)):
        timed(name, lambda s=s: steer_latents(denoiser, [prompt], [triplets], loss, s, x))
    p = out["plain"]["seconds"]
    out["ratios"] = {k: round(out[k]["seconds"] / p, 2)
                     for k in ("steered_worst_case", "steered_one_iteration")}
    return out


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are 0)."""
    scale = b.float().abs().max().item()
    return float(f"{(a.float() - b.float()).abs().max().item() / (scale or 1.0):.3g}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

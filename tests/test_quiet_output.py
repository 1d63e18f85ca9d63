"""Third-party libraries print nothing on stderr during l2s runs that the user cannot act on."""

import torch


def test_random_sd_build_prints_no_diffusers_dtype_warning(capfd):
    # Was, on every `--random-weights` SD run: "There are modules in UNet2DConditionModel that
    # should be kept in float32: []. Casting directly with `to()` ..." on stderr.
    from l2s.engine.registry import Preset, SteerDefaults
    from l2s.families.sd import build_random_sd
    from l2s.families.tiny import tiny_sd_components

    unet, vae, te, _, sch = tiny_sd_components()
    plain = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    configs = {"unet": plain(unet.config), "vae": plain(vae.config), "scheduler": plain(sch.config),
               "text_encoder": {**te.config.to_dict(), "vocab_size": 512}}
    preset = Preset("tiny-sd", "sd", None, "", 32, SteerDefaults(steps=2), configs=configs)
    capfd.readouterr()
    den = build_random_sd(preset, device=torch.device("cpu"), dtype=torch.float16)
    assert den.unet.dtype == torch.float16
    assert "float32" not in capfd.readouterr().err


# The fresh-interpreter check (importing the Flux helpers prints no torchvision warning) is in
# tests/test_api.py, which runs every fresh-interpreter check in one subprocess.

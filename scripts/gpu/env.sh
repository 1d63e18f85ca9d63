# Source from the repo root on a lent GPU machine (`. scripts/gpu/env.sh`): the one place that
# makes that machine run l2s. Its image has torch, transformers, accelerate, typer, pytest, but
# no diffusers: that comes from a wheel carried in .whl/ (run tool: carry [".whl"]; fetch it
# here with pip download, see /work/.library/device/README.md). Also puts the repo on
# PYTHONPATH and gives `python` to scripts that call it (the image has only python3).
if ! python3 -c "import diffusers" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/l2s-site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/l2s-site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "diffusers is not installed and no .whl/ was carried (run with carry: [\".whl\"])" >&2
    return 1
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
if ! command -v python > /dev/null; then
  mkdir -p /tmp/l2s-bin && ln -sf "$(command -v python3)" /tmp/l2s-bin/python
  export PATH=/tmp/l2s-bin:$PATH
fi

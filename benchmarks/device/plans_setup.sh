# Sourced by the device scripts that carry .device/plans (the wheels the image lacks): makes $OUT, sets the paths and
# quiet switches, installs the wheels into /tmp/site and records the versions and the GPU in $OUT/device.txt.
mkdir -p "$OUT" /tmp/site
export PYTHONPATH="$PWD:$PWD/benchmarks:$PWD/benchmarks/rpq:/tmp/site" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .device/plans/*.whl
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/device.txt"

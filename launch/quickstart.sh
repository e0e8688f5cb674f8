#!/usr/bin/env bash
# Quick start: install, build a dataset from the 1,797 handwritten digits that ship inside scikit-learn
# (nothing is downloaded besides packages), train a small PFGM++ model (D = 128) for a few minutes on the
# CPU (or the GPU if there is one), and write a grid of samples.
#
#   bash launch/quickstart.sh [MINUTES]        (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-5}
python3 -m venv .venv
.venv/bin/python -m pip install -q -e '.[quickstart]'
mkdir -p datasets
if [ ! -f datasets/digits-16x16.zip ]; then
    .venv/bin/python dataset_tool.py --source=embedded:digits --dest=datasets/digits-16x16.zip --resolution=16x16
fi
# Duration in Mimg for the given minutes at ~130 img/s (measured on 2 CPU cores); a GPU finishes sooner.
duration=$(python3 -c "print(round($minutes * 60 * 130 / 1e6, 4))")
.venv/bin/python train.py --outdir=training-runs --data=datasets/digits-16x16.zip --cond=0 \
    --pfgmpp=1 --aug_dim=128 --arch=ddpmpp --cbase=32 --cres=1,2,2 --nblock=2 --attn=8 \
    --batch=64 --lr=2e-3 --lr_rampup=0.002 --ema=0.005 --dropout=0 --augment=0 --xflip=0 \
    --duration="$duration" --tick=5 --snap=2 --dump=2 --grid=64 --desc=quickstart
run=$(ls -d training-runs/*-quickstart* | tail -n 1)
grid=$(ls "$run"/samples-*.png | tail -n 1)
echo
echo "Samples from the trained PFGM++ model (D = 128): $grid"
echo "Network snapshot: $(ls "$run"/network-snapshot-*.pt | tail -n 1)"

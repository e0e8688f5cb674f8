"""The PFGM++ reference's layout of a run directory's generated images, which its generate.py and fid.py use.

    generate.py --outdir=RUN --seeds=0-49999 [--ckpt=K0 --end_ckpt=K1] [--use_pickle=1] [--save_images]
    fid.py calc --images=RUN --ref=NPZ [--ckpt=K0 --end_ckpt=K1 --gen_seed=1]

generate.py without --network samples every checkpoint `training-state-NNNNNN.pt` of RUN (`.pkl` with
--use_pickle; NNNNNN = kimg) whose kimg lies in [--ckpt, --end_ckpt] (every one with --edm=1) into
RUN/ckpt_NNNNNN/, 1,000 images a subfolder; seed ranges that end above 49,999 go to RUN/ckpt_2_NNNNNN/, above
99,999 to RUN/ckpt_3_NNNNNN/ (the reference's three FID seed ranges). A folder that exists is skipped, so a rerun
does the checkpoints that are new. --save_images writes one grid of the first batch, RUN/ode_images_KIMG.png,
instead of the images. fid.py calc --images=RUN scores each image folder of the chosen seed range (--gen_seed 1,
2 or 3) with kimg in [--ckpt, --end_ckpt].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

STATE_NAME = re.compile(r"training-state-(\d+)\.(pt|pkl)")
FOLDER_NAME = re.compile(r"ckpt_(?:(?P<range>[23])_)?(?P<kimg>\d{6})")
LAST_KIMG = 100_000_000  # the reference's --end_ckpt default: every checkpoint


def checkpoints(run_dir, use_pickle: bool = False, first: int = 0, last: int = LAST_KIMG,
                every: bool = False) -> list[tuple[int, Path]]:
    """(kimg, path) of the training states of `run_dir` within [first, last] kimg (all with `every`), by kimg."""
    suffix = "pkl" if use_pickle else "pt"
    found = []
    for path in Path(run_dir).glob(f"training-state-*.{suffix}"):
        match = STATE_NAME.fullmatch(path.name)
        if match and path.is_file() and (every or first <= int(match[1]) <= last):
            found.append((int(match[1]), path))
    return sorted(found)


def seed_range(seeds: Sequence[int]) -> int:
    """The reference's seed range of a seed list, by its largest seed: 1 up to 49,999, 2 up to 99,999, else 3."""
    top = max(seeds)
    return 1 if top <= 49_999 else 2 if top <= 99_999 else 3


def image_folder(run_dir, kimg: int, seeds: Sequence[int]) -> Path:
    """RUN/ckpt_NNNNNN (or ckpt_2_NNNNNN, ckpt_3_NNNNNN): where the images of `seeds` of checkpoint `kimg` go."""
    index = seed_range(seeds)
    return Path(run_dir) / (f"ckpt_{kimg:06d}" if index == 1 else f"ckpt_{index}_{kimg:06d}")


def image_folders(images_dir, gen_seed: int = 1, first: int = 0, last: int = LAST_KIMG) -> list[tuple[int, Path]]:
    """(kimg, folder) of the image folders of seed range `gen_seed` in `images_dir` within [first, last] kimg."""
    if gen_seed not in (1, 2, 3):
        raise ValueError(f"--gen_seed must be 1 (seeds 0-49999), 2 (50000-99999) or 3 (100000-149999), got {gen_seed}")
    found = []
    for path in Path(images_dir).iterdir() if Path(images_dir).is_dir() else ():
        match = FOLDER_NAME.fullmatch(path.name)
        if match and path.is_dir() and int(match["range"] or 1) == gen_seed and first <= int(match["kimg"]) <= last:
            found.append((int(match["kimg"]), path))
    return sorted(found)


def has_image_folders(images_dir) -> bool:
    """Whether `images_dir` is laid out as the reference's generate.py writes a run directory (ckpt_* folders)."""
    path = Path(images_dir)
    return path.is_dir() and any(FOLDER_NAME.fullmatch(p.name) and p.is_dir() for p in path.iterdir())

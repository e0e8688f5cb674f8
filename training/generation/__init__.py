"""What comes out of a trained network: seeded images, latents, likelihoods.

- seeded.py: seeded, batch-independent generation (generate.py, `fid.py gen`, the metrics during training):
  `load_guided`, `generate`, `sample_seeds`, `parse_seeds`;
- images.py: uint8 quantisation (as PNGs store them) and PNG grids;
- latents.py: encode / decode through the probability-flow ODE, interpolation, temperature (generate.py's modes);
- likelihood.py: bits/dim through the same ODE (pfgmpp-likelihood);
- quantize.py: post-training weight quantisation of a copy of the network (the robustness study, `load_guided`).
"""

from training.generation.seeded import (
    MAX_SEEDS,
    SAMPLING_PRECISIONS,
    Batch,
    check_image_shape,
    check_network_options,
    class_labels,
    generate,
    load_guided,
    parse_seeds,
    sample_seeds,
)

__all__ = ["MAX_SEEDS", "SAMPLING_PRECISIONS", "Batch", "check_image_shape", "check_network_options", "class_labels",
           "generate", "load_guided", "parse_seeds", "sample_seeds"]

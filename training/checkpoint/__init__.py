"""Checkpoints: this program's two safe file formats, and the import of foreign ones. Nothing in a file is executed.

- network.py: network snapshots (`save_network`, `load_network`, `read_checkpoint`): one `torch.save` file of
  tensors and JSON, or a .safetensors file; `load_network` also reads EDM's, the PFGM++ reference's and EDM2's
  pickles, and the network of a training state.
- state.py: training states (`write_state`, `read_state`, `find_resume_state`): what an exact resume needs.
- legacy.py: the allow-listed unpickler that reads EDM's, PFGM++'s and EDM2's pickles as data.
- formats.py: the two formats' names and versions.
"""

from training.checkpoint.formats import FORMAT, STATE_FORMAT, STATE_VERSION, VERSION
from training.checkpoint.network import (
    check_finite,
    load_network,
    load_weights,
    network_config,
    network_from_config,
    read_checkpoint,
    recorded_images,
    recorded_provenance,
    save_network,
)
from training.checkpoint.state import STATE_PATTERN, find_resume_state, read_state, state_name, write_state

__all__ = ["FORMAT", "check_finite", "STATE_FORMAT", "STATE_PATTERN", "STATE_VERSION", "VERSION", "find_resume_state", "load_network",
           "load_weights", "network_config", "network_from_config", "read_checkpoint", "read_state", "recorded_images", "recorded_provenance", "save_network",
           "state_name", "write_state"]

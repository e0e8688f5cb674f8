"""The names and versions of this program's two file formats: network snapshots (network.py) and training states
(state.py). Each reader checks both, to tell a user who passed one where the other was wanted."""

FORMAT, VERSION = "pfgmpp-network", 1
STATE_FORMAT, STATE_VERSION = "pfgmpp-training-state", 2

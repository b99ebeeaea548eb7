"""What a fleet-wide ``POST /model`` can fail with, apart from the reconciler itself.

Kept out of ``fleet.py`` so the HTTP layer can name them without importing the Kubernetes client
(~44 MiB resident), which only cluster mode loads.
"""


class FleetUnavailableError(Exception):
    """The Kubernetes API cannot be reached, so the fleet's desired model cannot be read or written."""


class RolloutInProgressError(Exception):
    """A fleet rollout is converging (or another replica changed the desired model meanwhile)."""

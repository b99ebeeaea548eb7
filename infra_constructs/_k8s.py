"""The generated Kubernetes API types every construct builds on: the one place the cdk8s-plus line is picked.

cdk8s-plus-34 is the newest line that installs beside CDK Terrain: cdk8s-plus-35..37 (and
cdk8s-plus-34 after 2.0.58) need ``constructs>=10.8.1`` while ``cdktn`` 0.24 needs ``<10.8``.
Only stable, long-lived API versions are used, so the output also validates against older clusters.
"""

from cdk8s_plus_34 import k8s as k8s  # re-exported: the constructs import it from here

#: Oldest and newest Kubernetes minor versions the synthesized objects are validated against.
OLDEST_K8S_VERSION = "1.25"
NEWEST_K8S_VERSION = "1.37"

"""Hydra instantiates launchers only from the `hydra_plugins` namespace; the implementation is in p2o_hpc.cluster."""

from p2o_hpc.cluster.sweep_launcher import SweepLauncher


class P2OLauncher(SweepLauncher):
    """conf/hydra/launcher/p2o.yaml; see p2o_hpc.cluster.sweep_launcher."""

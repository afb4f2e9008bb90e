"""Hydra configuration groups shipped with hcc-fl (``pkg://hcc_fl.configs``)."""

"""Coordinator side of hcc-fl: ServerApp, strategies, simulation driver and run directory."""

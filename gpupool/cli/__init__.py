"""The ``gpupool`` command line: ``up``, ``demo``, ``status``, ``agents``, ``drain``, ``cordon``, ``jobs``."""

"""gpupool's benchmark (``scripts/bench``): gpupool against its limits and its rivals, measured in one run."""

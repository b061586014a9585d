"""``python -m gpupool.coordinator``: the same as ``gpupool coordinator``."""

from __future__ import annotations

import sys

from gpupool.coordinator.main import main

if __name__ == "__main__":
    sys.exit(main())

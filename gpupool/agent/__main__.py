"""``python -m gpupool.agent``: the same as ``gpupool-agent``."""

import sys

from gpupool.agent.main import main

sys.exit(main())

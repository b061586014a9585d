"""Generated from protos/gpupool/v1 by scripts/gen-protos. Do not edit."""

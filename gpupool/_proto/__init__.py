"""Generated protobuf and gRPC modules (scripts/gen-protos). Do not edit."""

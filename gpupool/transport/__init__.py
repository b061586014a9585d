"""Network edges: MQTT sessions, gRPC channels and servers, retry policy."""

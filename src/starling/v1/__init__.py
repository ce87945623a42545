"""Generated gRPC stubs of proto/starling/v1 (python proto/generate.py)."""

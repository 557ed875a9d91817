"""The Open Inference Protocol over gRPC (inference.GRPCInferenceService): tensors to and from
protobuf messages (tensors.py), the RPCs over the inference core (servicer.py), and the vendored
service definition with its generated stubs (inference.proto, inference_pb2*.py)."""

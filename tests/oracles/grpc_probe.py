"""A generic gRPC client (grpcio, not the project's code) probing a ddpo coordinator: the standard health
service and server reflection. Prints one JSON object.

usage: grpc_probe.py HOST:PORT
"""
import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2

addr = sys.argv[1]
out = {}
with grpc.insecure_channel(addr) as ch:
    health = health_pb2_grpc.HealthStub(ch)
    for svc in ["", "ddpo.v1.Coordinator"]:
        r = health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=10)
        out[f"health[{svc}]"] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    reqs = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="ddpo.v1.Coordinator"),
    ]
    resps = list(refl.ServerReflectionInfo(iter(reqs), timeout=10))
    out["services"] = sorted(s.name for s in resps[0].list_services_response.service)
    methods = []
    for raw in resps[1].file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        for s in fd.service:
            if s.name == "Coordinator":
                methods = [m.name for m in s.method]
    out["coordinator_methods"] = methods
print(json.dumps(out))

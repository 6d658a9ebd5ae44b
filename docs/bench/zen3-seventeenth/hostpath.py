import time, torch, numpy as np, statistics
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.control.deployment import Deployment
from faasmoe.functions.expert import ExpertFunction
from faasmoe.functions import wire
from faasmoe.platforms.local import protocol
from faasmoe.platforms.local.host import Host
torch.set_num_threads(1)
ck = Checkpoint("models/qwen-quarter")
dep = Deployment.plan(ck, 60, "bfloat16")
spec = dep.specs[0]
host = Host(compiled=True)
host.load(spec.to_json())
fn = host.functions[spec.id][0]
fn.warm_up()
x = torch.randn(1, spec.hidden_size).to(torch.bfloat16)
inv = wire.Invocation(fn.digest, spec.layer, spec.block, x, torch.zeros(4, dtype=torch.int32),
                      torch.tensor([3, 17, 29, 44], dtype=torch.int32), torch.rand(4))
frame = wire.encode_invocation(inv)
msg = protocol.encode_request(protocol.Request([], [], [(spec.id, frame)]))
def t(name, f, n=3000):
    for _ in range(100): f()
    ts = []
    for _ in range(n):
        s = time.perf_counter(); f(); ts.append(time.perf_counter() - s)
    print(f"{name}: median {statistics.median(ts)*1e6:.1f} us")
t("decode_request", lambda: protocol.decode_request(msg))
t("decode_invocation_parts", lambda: wire.decode_invocation_parts(frame))
h, hidden, token, expert, weight = wire.decode_invocation_parts(frame)
t("check", lambda: fn.check(h, expert))
local = fn.check(h, expert)
with torch.inference_mode():
    t("_one_token (compute, weights in cache)", lambda: fn._one_token(hidden, local, weight))
t("fn.handle", lambda: fn.handle(frame))
t("whole request: decode, handle, encode_reply", lambda: protocol.encode_reply(host.handle(protocol.decode_request(msg))))

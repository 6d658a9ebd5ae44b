import os, socket, time, sys
a, b = socket.socketpair()
N = 3000
spin = len(sys.argv) > 1
pid = os.fork()
if pid == 0:
    a.close()
    if spin: b.setblocking(False)
    while True:
        if spin:
            while True:
                try: m = b.recv(64); break
                except BlockingIOError: pass
        else:
            m = b.recv(64)
        if m == b"q": os._exit(0)
        b.send(m)
b.close()
if spin: a.setblocking(False)
ts = []
for i in range(N):
    t = time.perf_counter()
    a.send(b"x")
    if spin:
        while True:
            try: a.recv(64); break
            except BlockingIOError: pass
    else:
        a.recv(64)
    ts.append(time.perf_counter() - t)
    if not spin and os.environ.get("NAP") and i % 10 == 0: time.sleep(float(os.environ["NAP"]))  # let the partner sleep sometimes
a.send(b"q"); os.waitpid(pid, 0)
ts.sort()
print(f"spin={spin}: median {ts[N//2]*1e6:.0f} us, p10 {ts[N//10]*1e6:.0f}, p90 {ts[9*N//10]*1e6:.0f}")

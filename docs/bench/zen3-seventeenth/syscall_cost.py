import os, time, statistics, torch, socket
torch.set_num_threads(1)
x = torch.randn(1, 512).to(torch.bfloat16); y = x.clone()
a, b = socket.socketpair(); a.setblocking(False)
def t(name, f, n=20000):
    for _ in range(100): f()
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
print(f"getppid: {t('g', os.getppid):.2f} us")
def nb():
    try: a.recv(1)
    except BlockingIOError: pass
print(f"non-blocking recv (EAGAIN): {t('r', nb):.2f} us")
print(f"x + y: {t('a', lambda: x + y):.2f} us")
print(f"getppid then x + y: {t('b', lambda: (os.getppid(), x + y)):.2f} us")
print(f"5 getppid then x + y: {t('c', lambda: (os.getppid(), os.getppid(), os.getppid(), os.getppid(), os.getppid(), x + y)):.2f} us")

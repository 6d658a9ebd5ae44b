# FBGEMM's packing, one thread
import torch, time, warnings
warnings.filterwarnings("ignore")
for N, K in ((704, 512), (8192, 512), (151936, 512)):
    w = (torch.randn(N, K) / 20)
    t = time.perf_counter(); torch.fbgemm_pack_gemm_matrix_fp16(w); a = time.perf_counter() - t
    t = time.perf_counter(); torch.ops.quantized.linear_prepack_fp16(w, None); b = time.perf_counter() - t
    print(f"{N}x{K}: fbgemm_pack {a*1e3:.1f} ms ({a/w.numel()*1e9:.1f} ns/elem), quantized prepack {b*1e3:.1f} ms ({b/w.numel()*1e9:.1f} ns/elem)")

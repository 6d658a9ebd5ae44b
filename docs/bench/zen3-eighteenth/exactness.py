# FBGEMM's fp16 products against F.linear's bf16 ones and the fp32 product
import torch, warnings, torch.nn.functional as F
warnings.filterwarnings("ignore")
g = torch.Generator().manual_seed(0)
for N, K in ((48, 64), (17, 33), (2472, 112), (1, 512), (704, 512), (512, 352)):
    w = (torch.randn(N, K, generator=g) * 0.05).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    p = torch.fbgemm_pack_gemm_matrix_fp16(w.float())
    worst = 0; eq = tot = 0
    for M in (1, 2, 3, 5, 8, 17, 64):
        x = torch.randn(M, K, generator=g).to(torch.bfloat16)
        for bias in (None, b):
            ref32 = F.linear(x.float(), w.float(), None if bias is None else bias.float())
            y = torch.fbgemm_linear_fp16_weight_fp32_activation(x.float(), p, None if bias is None else bias.float())
            worst = max(worst, (y - ref32).abs().max().item())
            eq += (y.to(torch.bfloat16) == F.linear(x, w, bias)).sum().item(); tot += y.numel()
    print(f"{N}x{K}: max |fp32 diff| {worst:.2e}; bf16 equal to F.linear {eq}/{tot}")

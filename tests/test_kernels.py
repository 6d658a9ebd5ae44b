"""`kernels.linear`: multi-row bf16 products through fp32 on CPUs without bf16 instructions, row counts padded where
native, one row as a matrix-vector product where native."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from faasmoe.models import kernels


@pytest.fixture
def gemm_path(monkeypatch):
    """gemm_path("native" | "fp32"): FAASMOE_BF16_GEMM for one test (the detection is cached, so cleared)."""
    def choose(choice: str) -> None:
        monkeypatch.setenv("FAASMOE_BF16_GEMM", choice)
        kernels.native_half_gemm.cache_clear()

    yield choose
    kernels.native_half_gemm.cache_clear()


@pytest.fixture
def fp32_path(gemm_path):
    gemm_path("fp32")


@pytest.fixture
def native_path(gemm_path):
    gemm_path("native")


@pytest.mark.parametrize("rows", [1, 3, 4, 16])
def test_bf16_products_equal_an_fp32_product_rounded_whatever_the_slicing(fp32_path, monkeypatch, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
    w = torch.randn(300, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(300, generator=g).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "CHUNK", 64 * 7)  # 7 weight rows at a time: 43 slices, the last one short
    out = kernels.linear(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 300)
    if rows < kernels.MIN_ROWS:
        assert torch.equal(out, F.linear(x, w, b))
    else:
        ref = F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16)
        assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_fp32_products_and_the_override_are_left_alone(fp32_path):
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    assert kernels.native_half_gemm() is False


def test_a_bad_override_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "fast")
    kernels.native_half_gemm.cache_clear()
    try:
        with pytest.raises(ValueError, match="native or fp32"):
            kernels.native_half_gemm()
    finally:
        kernels.native_half_gemm.cache_clear()


@pytest.mark.parametrize("rows", [2, 3, 5, 8, 100])
def test_native_products_pad_rows_to_a_power_of_two_and_answer_the_rows_asked(monkeypatch, rows):
    """A bounded set of GEMM shapes (oneDNN keeps a kernel per shape: memory grew with every new row count)."""
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "native")
    kernels.native_half_gemm.cache_clear()
    seen = []
    real = F.linear
    monkeypatch.setattr(kernels.F, "linear", lambda x, w, b=None: seen.append(x.shape[0]) or real(x, w, b))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
        w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
        b = torch.randn(48, generator=g).to(torch.bfloat16)
        out = kernels.linear(x, w, b)
    finally:
        kernels.native_half_gemm.cache_clear()
    assert seen == [1 << (rows - 1).bit_length()] and out.shape == (rows, 48) and out.dtype == torch.bfloat16
    ref = F.linear(x.float(), w.float(), b.float())
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=5e-2)


@pytest.mark.skipif(not kernels.cpu_has_bf16(), reason="equality measured where oneDNN multiplies bf16 natively")
@pytest.mark.parametrize("rows", [2, 3, 5, 8, 9])
def test_a_few_rows_multiply_the_weight_first_as_f_linear_does(native_path, monkeypatch, rows):
    """w @ x.T lets oneDNN read the weight as it lies, where F.linear re-lays it out at every call: the same
    result, contiguous, up to WEIGHT_FIRST_ROWS padded rows (more take F.linear)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 512, generator=g).to(torch.bfloat16)
    w = torch.randn(704, 512, generator=g).to(torch.bfloat16)
    ref = F.linear(x, w)
    seen = []
    real_mm, real_linear = torch.mm, F.linear
    monkeypatch.setattr(kernels.torch, "mm", lambda a, b: seen.append("mm") or real_mm(a, b))
    monkeypatch.setattr(kernels.F, "linear", lambda a, b, c=None: seen.append("linear") or real_linear(a, b, c))
    out = kernels.linear(x, w)
    assert seen == (["mm"] if rows <= kernels.WEIGHT_FIRST_ROWS else ["linear"])
    assert out.shape == (rows, 704) and out.is_contiguous() and torch.equal(out, ref)
    seen.clear()
    kernels.linear(x, torch.randn(704, 1024, generator=g).to(torch.bfloat16)[:, :512])  # a strided weight
    assert seen == ["linear"]


def test_native_one_row_products_are_matrix_vector_products(monkeypatch):
    """Faster than oneDNN's GEMM for one row (which packs the weights at every call), same fp32 accumulation;
    with a bias, the same result as F.linear's."""
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "native")
    kernels.native_half_gemm.cache_clear()
    calls = []
    real, real_addmv = torch.mv, torch.addmv
    monkeypatch.setattr(kernels.torch, "mv", lambda w, v: calls.append(w.shape) or real(w, v))
    monkeypatch.setattr(kernels.torch, "addmv", lambda b, w, v: calls.append(("bias", *w.shape)) or real_addmv(b, w, v))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 64, generator=g).to(torch.bfloat16)
        w = torch.randn(48, 64, generator=g).to(torch.bfloat16)
        b = torch.randn(48, generator=g).to(torch.bfloat16)
        out = kernels.linear(x, w)
        with_bias = kernels.linear(x, w, b)
        strided = kernels.linear(x, torch.randn(48, 128, generator=g).to(torch.bfloat16)[:, :64])
    finally:
        kernels.native_half_gemm.cache_clear()
    assert calls == [(48, 64), ("bias", 48, 64)]  # not for a strided weight: F.linear there
    assert out.shape == (1, 48) and out.dtype == torch.bfloat16 and strided.shape == (1, 48)
    assert torch.allclose(out.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=5e-2)
    assert torch.allclose(with_bias.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)  # equal on the Xeon


@pytest.mark.parametrize("path", ["native", "fp32"])
def test_a_vector_is_multiplied_as_its_one_row_is(monkeypatch, path):
    """A one-token call's row as a vector [K] -> [N]: bit for bit the one-row product, in every dtype and with a
    bias, a strided weight or int8 weights (those take the row path)."""
    from faasmoe.models.quantize import quantize_int8

    monkeypatch.setenv("FAASMOE_BF16_GEMM", path)
    kernels.native_half_gemm.cache_clear()
    try:
        g = torch.Generator().manual_seed(1)
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            x = torch.randn(64, generator=g).to(dtype)
            w = torch.randn(48, 64, generator=g).to(dtype)
            b = torch.randn(48, generator=g).to(dtype)
            strided = torch.randn(48, 128, generator=g).to(dtype)[:, :64]
            for weight, bias in ((w, None), (w, b), (strided, None)):
                out = kernels.linear(x, weight, bias)
                assert out.shape == (48,) and out.dtype == dtype
                assert torch.equal(out, kernels.linear(x[None], weight, bias)[0])
        q = kernels.Int8Weight(*quantize_int8(torch.randn(48, 64, generator=g), torch.bfloat16))
        x = torch.randn(64, generator=g).to(torch.bfloat16)
        assert torch.equal(kernels.linear(x, q), kernels.linear(x[None], q)[0])
    finally:
        kernels.native_half_gemm.cache_clear()


needs_onednn_bf16 = pytest.mark.skipif(not (kernels._onednn_bf16() and kernels.cpu_has_bf16()),
                                       reason="packing applies where oneDNN multiplies bf16 natively")


@needs_onednn_bf16
@pytest.mark.parametrize("shape", [(48, 64), (704, 512), (60, 512)])
def test_packed_products_equal_f_linear_bit_for_bit(native_path, shape):
    """The packed layout is what F.linear builds at every call: the same kernel, the same result, for a vector,
    one row and row counts padded to a power of two, with and without a bias."""
    g = torch.Generator().manual_seed(2)
    N, K = shape
    w = torch.randn(N, K, generator=g).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    packed = kernels.pack(w)
    assert packed.is_mkldnn and packed.shape == w.shape
    for rows in (1, 3, 6, 8, 17):
        x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
        for bias in (None, b):
            assert torch.equal(kernels.linear(x, packed, bias), F.linear(x, w, bias))
    v = torch.randn(K, generator=g).to(torch.bfloat16)
    assert torch.equal(kernels.linear(v, packed), F.linear(v[None], w)[0])


needs_fbgemm = pytest.mark.skipif(not kernels._fbgemm_fp16(), reason="FBGEMM's fp16 products need an x86 CPU with AVX2")


def _fp32_rounded(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@needs_fbgemm
@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp16_packed_products_are_an_fp32_product_rounded_once(fp32_path, monkeypatch, sharded, threads):
    """Without bf16 instructions a large enough bf16 matrix is held as FBGEMM's fp16: rows multiplied in fp32 and
    rounded once, as torch's bf16 GEMM accumulates (the order of the sum aside: at most one rounding step apart),
    a vector as its one row; packed whole or in slices of rows, for one thread or two, the same bits."""
    g = torch.Generator().manual_seed(3)
    N, K = 300, 256  # 76,800 elements: over FP16_MIN_ELEMENTS, N not a multiple of any block
    w = (torch.randn(N, K, generator=g) / 16).to(torch.bfloat16)
    b = torch.randn(N, generator=g).to(torch.bfloat16)
    whole = kernels.pack(w)
    if sharded:
        monkeypatch.setattr(kernels, "FP16_SHARD_ELEMENTS", 64 * K)  # slices of 64 rows: 5, the last one short
    packed = kernels.pack(w, threads)
    assert isinstance(packed, kernels.Fp16Weight) and packed.shape == w.shape
    assert len(packed.shards) == (5 if sharded else 1) and packed.threaded is (sharded and threads > 1)
    same = total = 0
    for rows in (1, 3, 6, 17):
        x = torch.randn(rows, K, generator=g).to(torch.bfloat16)
        for bias in (None, b):
            out = kernels.linear(x, packed, bias)
            ref = _fp32_rounded(x, w, bias)
            assert out.dtype == torch.bfloat16 and out.shape == (rows, N)
            exact = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            sums = F.linear(x.double().abs(), w.double().abs(), None if bias is None else bias.double().abs())
            # one bf16 rounding step of the result, and an fp32 sum's error in whatever order it was taken
            assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + K * 2 ** -24 * sums).all()
            same += int((out == ref).sum())
            total += out.numel()
            assert torch.equal(kernels.linear(x, whole, bias), out)
            with kernels.torch_threads(threads):
                assert torch.equal(kernels.linear(x, packed, bias), out)
    assert same >= 0.99 * total
    v = torch.randn(K, generator=g).to(torch.bfloat16)
    assert torch.equal(kernels.linear(v, packed, b), kernels.linear(v[None], packed, b)[0])


@needs_fbgemm
def test_fp16_packing_keeps_what_fp16_cannot_hold(fp32_path, monkeypatch):
    """A bf16 value beyond fp16's range keeps its matrix bf16; magnitudes under 2^-17 round to fp16's subnormal
    steps, an error below 2^-25 each; a matrix under FP16_MIN_ELEMENTS stays as it is, and so does everything
    where FBGEMM is missing."""
    g = torch.Generator().manual_seed(4)
    N, K = 256, 256
    w = (torch.randn(N, K, generator=g) / 16).to(torch.bfloat16)
    big = w.clone()
    big[7, 9] = 70000.0
    assert kernels.pack(big) is big
    tiny = ((torch.rand(N, K, generator=g) - 0.5) * 2 ** -16).to(torch.bfloat16)  # every value under 2^-17
    packed = kernels.pack(tiny)
    assert isinstance(packed, kernels.Fp16Weight)
    x = torch.randn(4, K, generator=g).to(torch.bfloat16)
    exact = F.linear(x.double(), tiny.double())
    got = kernels.linear(x, packed).double()  # rounded to bf16: one step of the result, plus the weights' error
    assert ((got - exact).abs() <= exact.abs() * 2 ** -8 + K * 2 ** -25 * x.double().abs().max()).all()
    assert (got - exact).norm() < 0.05 * exact.norm()  # not flushed to zero: held to fp16's subnormal steps
    small = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    assert small.numel() < kernels.FP16_MIN_ELEMENTS and kernels.pack(small) is small
    monkeypatch.setattr(kernels, "_fbgemm_fp16", lambda: False)
    assert kernels.pack(w) is w


def test_what_cannot_be_packed_is_left_as_it_is(monkeypatch):
    from faasmoe.models.quantize import quantize_int8

    q = kernels.Int8Weight(*quantize_int8(torch.randn(48, 64), torch.bfloat16))
    fp32, vector = torch.randn(48, 64), torch.randn(64).to(torch.bfloat16)
    assert kernels.pack(fp32) is fp32 and kernels.pack(vector) is vector
    assert kernels.pack_matrix(q) is q and kernels.pack_matrix(None) is None
    monkeypatch.setenv("FAASMOE_BF16_GEMM", "fp32")  # no bf16 instructions: no oneDNN layout (FBGEMM's fp16 from
    kernels.native_half_gemm.cache_clear()  # FP16_MIN_ELEMENTS on)
    try:
        bf16 = torch.randn(48, 64).to(torch.bfloat16)
        assert kernels.pack(bf16) is bf16
    finally:
        kernels.native_half_gemm.cache_clear()


def _answers(model: str, tokens: int) -> tuple[torch.Tensor, list[int]]:
    """A bf16 monolithic model's logits over a prompt, and the greedy tokens after it."""
    from faasmoe.engines.monolithic import MonolithicEngine

    with MonolithicEngine(model, dtype="bfloat16") as m:
        ids = m.encode("The capital of France is Paris. The capital of Germany is")
        return m.logits(ids), m.generate(ids, max_tokens=tokens, ignore_eos=True).token_ids


@needs_onednn_bf16
def test_a_packed_model_computes_what_f_linear_computes(native_path, tiny, monkeypatch):
    """A bf16 monolithic model with its matrices packed gives the logits and tokens of the same model with every
    product F.linear's on the row-major weights (equal on this model's shapes; see kernels' docstring)."""
    from faasmoe.engines.monolithic import MonolithicEngine

    with MonolithicEngine(tiny, dtype="bfloat16") as m:
        cp = m.control_plane
        assert cp.layers[0].attn.wqkv.is_mkldnn and cp.lm_head.is_mkldnn and cp.layers[0].attn.wo.is_mkldnn
        assert all(w.is_mkldnn for fn in m.experts.layers.values() for w in (*fn.gate_up, *fn.down))
    packed = _answers(tiny, 6)
    monkeypatch.setattr(kernels, "pack", lambda w, threads=1: w)  # nothing packed
    monkeypatch.setattr(kernels, "_matrix_vector", lambda v, w, b: None)  # one row: F.linear too
    monkeypatch.setattr(kernels, "WEIGHT_FIRST_ROWS", 0)  # and a few rows
    plain = _answers(tiny, 6)
    assert torch.equal(packed[0], plain[0]) and packed[1] == plain[1]


@needs_fbgemm
def test_a_model_with_fp16_packed_matrices_answers_as_unpacked(fp32_path, tiny, monkeypatch):
    """Without bf16 instructions the bf16 monolithic model holds its matrices as FBGEMM's fp16 (all of them here:
    the tiny model's are under FP16_MIN_ELEMENTS but for its lm_head): the logits of the same model with every
    product on the bf16 weights, within a few bf16 rounding steps, and its greedy tokens."""
    from faasmoe.control import resident
    from faasmoe.engines.monolithic import MonolithicEngine

    monkeypatch.setattr(kernels, "FP16_MIN_ELEMENTS", 0)
    with MonolithicEngine(tiny, dtype="bfloat16") as m:
        cp = m.control_plane
        assert all(isinstance(w, kernels.Fp16Weight) for w in (cp.layers[0].attn.wqkv, cp.layers[0].attn.wo))
        assert cp.lm_head is cp.embed or isinstance(cp.lm_head, kernels.Fp16Weight)
        experts = [w for fn in m.experts.layers.values() for w in (*fn.gate_up, *fn.down)]
        assert all(isinstance(w, kernels.Fp16Weight) for w in experts)
    packed = _answers(tiny, 8)
    monkeypatch.setattr(kernels, "pack", lambda w, threads=1: w)  # nothing packed: the control plane's and the
    monkeypatch.setattr(resident, "pack", lambda w, threads=1: w)  # experts' own
    plain = _answers(tiny, 8)
    assert (packed[0].float() - plain[0].float()).abs().max() <= 0.05 * plain[0].float().abs().max()
    assert packed[1] == plain[1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_is_transformers_rms_norm_bit_for_bit(dtype):
    """torch's rms_norm on a 16-bit input (normalised in fp32, rounded back) and the weight applied after: what
    transformers' module computes, rounding included, over rows of very different scales."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRMSNorm

    from faasmoe.models.layers import rms_norm

    g = torch.Generator().manual_seed(0)
    ref = Qwen2MoeRMSNorm(512, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(512, generator=g) * 2)
        for rows in (1, 3, 17):
            x = (torch.randn(rows, 512, generator=g) * 10.0 ** torch.randint(-3, 3, (rows, 1), generator=g)).to(dtype)
            assert torch.equal(rms_norm(x, ref.weight, 1e-6), ref(x))


@pytest.mark.parametrize("path", ["native", "fp32"])
def test_half_attention_runs_in_fp32_where_the_cpu_has_no_bf16_instructions(gemm_path, path):
    """Without bf16 instructions a bf16 attention is torch's fp32 one, rounded once: within a bf16 rounding step of
    the float64 attention (decode and prefill, a mask, grouped heads); with them it is torch's bf16 kernel, and
    fp32 inputs are torch's own on either path."""
    gemm_path(path)
    g = torch.Generator().manual_seed(11)
    for t, S, heads, kv_heads, mask in [(1, 1, 4, 4, None), (1, 150, 4, 4, None), (1, 40, 8, 2, None),
                                        (5, 12, 4, 4, torch.rand(5, 12, generator=g) > 0.3), (7, 7, 4, 2, "causal")]:
        q = torch.randn(1, heads, t, 32, generator=g).to(torch.bfloat16)
        k, v = (torch.randn(1, kv_heads, S, 32, generator=g).to(torch.bfloat16) for _ in range(2))
        if isinstance(mask, torch.Tensor):
            mask[:, 0] = True  # every query sees a key
        opts = dict(attn_mask=mask if isinstance(mask, torch.Tensor) else None, is_causal=mask == "causal",
                    enable_gqa=heads != kv_heads)
        out = kernels.attention(q, k, v, **opts)
        assert out.dtype == torch.bfloat16 and out.shape == q.shape
        if path == "native":
            assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **opts))
        else:
            assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **opts).to(q.dtype))
            exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **opts)
            assert ((out.double() - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()
        q32, k32, v32 = q.float(), k.float(), v.float()
        assert torch.equal(kernels.attention(q32, k32, v32, **opts), F.scaled_dot_product_attention(q32, k32, v32, **opts))

"""Time each Triton kernel beside its torch reference (and torch's own fused op where there is one).

    python benchmarks/triton_kernels.py            # prints a markdown table for benchmarks/RESULTS.md

Each op is called as the model calls it (the torch.ops.llmfn custom ops) and timed twice: with
`do_bench` (host launch cost included, which dominates at decode sizes) and with
`do_bench_cudagraph` (one CUDA graph replay: the GPU work alone).

Needs a CUDA GPU; on a CPU-only machine it says so and exits 0. Shapes are a decoder layer of
SmolLM2-135M (d=576, 9/3 heads of 64) and of Llama-3-8B (d=4096, 32/8 heads of 128)."""

import sys

import torch


def bench_layer(bench, name: str, dim: int, hq: int, hk: int, hd: int) -> None:
    """One decoder layer's kernels at this model's sizes (fp16 on the current CUDA device)."""
    from llmfn.kernels import reference as ref
    from llmfn.kernels import triton_attention, triton_int4, triton_norm, triton_rope

    dev, dt = "cuda", torch.float16
    for tokens in (1, 2048):
        x = torch.randn(tokens, dim, device=dev, dtype=dt)
        r = torch.randn_like(x)
        w = torch.randn(dim, device=dev, dtype=dt)
        bench(
            "add_rms_norm",
            f"{name} T={tokens}",
            lambda x=x, r=r, w=w: triton_norm.add_rms_norm(x, r, w, 1e-6),
            lambda x=x, r=r, w=w: ref.add_rms_norm(x, r, w, 1e-6),
            "torch reference",
        )

        q = torch.randn(1, tokens, hq, hd, device=dev, dtype=dt)
        k = torch.randn(1, tokens, hk, hd, device=dev, dtype=dt)
        ang = torch.randn(1, tokens, hd // 2, device=dev)
        cos, sin = ang.cos(), ang.sin()
        bench(
            "rope (in place)",
            f"{name} T={tokens}",
            lambda q=q, k=k, c=cos, s=sin: triton_rope.rope_(q, k, c, s),
            lambda q=q, k=k, c=cos, s=sin: ref.apply_rope(q, k, c, s),
            "torch reference",
        )

    # prefill: 2048 new tokens into an empty 4096-slot cache
    t, s = 4096, 2048
    q = torch.randn(1, hq, s, hd, device=dev, dtype=dt)
    k = torch.randn(1, hk, t, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    pos = torch.arange(s, device=dev)[None]
    bench(
        "attention prefill",
        f"{name} s={s} cache={t}",
        lambda: triton_attention.attention(q, k, v, pos, hd**-0.5),
        lambda: ref.attention(q, k, v, pos, hd**-0.5),
        "torch SDPA + mask",
    )
    kk, vv = k[:, :, :s], v[:, :, :s]
    bench(
        "attention prefill",
        f"{name} s={s} causal",
        lambda: triton_attention.attention(q, kk, vv, pos, hd**-0.5),
        lambda: torch.nn.functional.scaled_dot_product_attention(
            q, kk, vv, is_causal=True, scale=hd**-0.5, enable_gqa=hq != hk
        ),
        "SDPA is_causal (flash)",
    )

    # decode: 8 rows at position 4000 of an 8192-slot cache
    b, t = 8, 8192
    q = torch.randn(b, hq, 1, hd, device=dev, dtype=dt)
    k = torch.randn(b, hk, t, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    pos = torch.full((b, 1), 4000, device=dev)
    bench(
        "attention decode",
        f"{name} b={b} pos=4000 cache={t}",
        lambda: triton_attention.attention(q, k, v, pos, hd**-0.5),
        lambda: ref.attention(q, k, v, pos, hd**-0.5),
        "torch SDPA + mask",
    )

    # int4 weight-only: the MLP up projection (d -> 4d), group 128 (64 where d is no multiple of 128)
    n, g = 4 * dim, 128 if dim % 128 == 0 else 64
    qw, sc, z = ref.quantize_int4(torch.randn(n, dim, device=dev, dtype=dt), g)
    dense = ref.dequantize_int4(qw, sc, z, g, dt)
    for m in (1, 16, 512):
        xm = torch.randn(m, dim, device=dev, dtype=dt)
        bench(
            "int4 matmul",
            f"{name} m={m} {n}x{dim} g={g}",
            lambda xm=xm: triton_int4.int4_matmul(xm, qw, sc, z, g),
            lambda xm=xm: ref.int4_matmul(xm, qw, sc, z, g),
            "torch dequantize + matmul",
        )
        bench(
            "int4 matmul",
            f"{name} m={m} {n}x{dim} g={g}",
            lambda xm=xm: triton_int4.int4_matmul(xm, qw, sc, z, g),
            lambda xm=xm: xm @ dense.t(),
            "fp16 dense matmul",
        )


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py: needs a CUDA GPU (none found); nothing timed.")
        return 0

    from triton.testing import do_bench, do_bench_cudagraph

    rows: list[tuple[str, str, float, float, float, float, str]] = []

    def bench(op: str, shape: str, ours, theirs, peer: str) -> None:
        ours(), theirs()  # compile / warm up
        rows.append((op, shape, do_bench(ours), do_bench(theirs), do_bench_cudagraph(ours),
                     do_bench_cudagraph(theirs), peer))  # fmt: skip

    for model in (("smollm2-135m", 576, 9, 3, 64), ("llama3-8b", 4096, 32, 8, 128)):
        bench_layer(bench, *model)

    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fp16, times from triton.testing.do_bench\n"
    )
    print("| op | shape | peer | llmfn ms | peer ms | speedup | llmfn graph ms | peer graph ms | graph speedup |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for op, shape, ours, theirs, ours_g, theirs_g, peer in rows:
        print(f"| {op} | {shape} | {peer} | {ours:.4f} | {theirs:.4f} | {theirs / ours:.2f}x | "
              f"{ours_g:.4f} | {theirs_g:.4f} | {theirs_g / ours_g:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Triton RoPE kernel against the torch kernel: through Triton's interpreter on a CPU, natively on a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

CHECK = textwrap.dedent(
    """
    import torch
    from functools import partial
    from megatron_harpe.kernels import harpe_rope_qk
    from megatron_harpe.rotary import inverse_frequencies

    device = "{device}"
    worst = {{}}
    # Errors relative to the largest input m (q, k, or incoming gradient). bf16 (half-ulp 2^-9 below 1,
    # 2^-8 for results in [1, 2)): the torch path rounds cos and sin (2 * 2^-9 m), both products
    # (2 * 2^-9 m) and the sum (2^-8 m); Triton rounds the result once (2^-8 m): 8 * 2^-9 m in all.
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 8 * 2.0 ** -9)]:
        for interleaved in (False, True):
            for shape, groups in [((24, 2, 8, 32), 2), ((24, 4, 32), 4), ((16, 1, 4, 32), 4)]:
                gen = torch.Generator().manual_seed(0)
                rows, heads, dim = shape[0], shape[-2], shape[-1]
                rot = dim if len(shape) == 4 and shape[1] == 2 else dim // 2  # one case with a pass-through tail
                q = torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
                k = torch.randn(shape[:-2] + (groups, dim), generator=gen).to(device, dtype).requires_grad_()
                positions = (torch.arange(rows, dtype=torch.float32) * 997 + 5).to(device)
                inv = inverse_frequencies([1e4 * 10 ** g for g in range(groups)], rot).to(device)
                outs = []
                scale = (q.abs().max().item(), k.abs().max().item(), 1.0, 1.0)
                for fn in (partial(harpe_rope_qk, impl="triton"), partial(harpe_rope_qk, impl="torch")):
                    oq, ok = fn(q, k, positions, inv, interleaved)
                    weight_q = torch.linspace(-1, 1, oq.numel(), device=device).view_as(oq)
                    weight_k = torch.linspace(1, -1, ok.numel(), device=device).view_as(ok)
                    gq, gk = torch.autograd.grad((oq.float() * weight_q).sum() + (ok.float() * weight_k).sum(), (q, k))
                    outs.append((oq, ok, gq, gk))
                for name, size, a, b in zip(("q", "k", "grad q", "grad k"), scale, *outs):
                    err = ((a.float() - b.float()).abs().max() / size).item()
                    key = f"{{dtype}} interleaved={{interleaved}} {{len(shape)}}D {{name}}"
                    assert err <= tol, f"{{key}}: relative error {{err}} > {{tol}}"
                    worst[key] = err
    print("ok", max(worst.values()))
    """
)


def test_triton_kernel_matches_torch_kernel_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", CHECK.format(device="cpu")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.mark.gpu
def test_triton_kernel_matches_torch_kernel_on_gpu():
    done = subprocess.run([sys.executable, "-c", CHECK.format(device="cuda")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# 64-bit offsets. q and k are views of megatron's fused QKV, so the kernel's row offset counts the whole
# base: row * stride reaches 2^31 once the base holds 2^31 elements (7B at TP1/CP1 with micro-batch 2 at
# 128k tokens). Positions repeat every 8192 rows: the angles stay moderate, this is about addressing only.

LARGE = textwrap.dedent(
    """
    import torch
    from megatron_harpe.kernels.torch_rope import rotate_qk_torch
    from megatron_harpe.kernels.triton_rope import rotate_qk_triton
    from megatron_harpe.rotary import inverse_frequencies

    device, full = "{device}", {full}
    TOL = 8 * 2.0 ** -9  # bf16, relative to the largest input (the bound derived in CHECK above)

    def compare(q, k, rows, inverse, what):
        positions = (torch.arange(q.size(0), device=device) % 8192).float()
        inv = inverse_frequencies([1e4 * 1.3 ** g for g in range(k.size(-2))], q.size(-1)).to(device)
        got = rotate_qk_triton(q, k, positions, inv, False, inverse)
        want = rotate_qk_torch(q[rows], k[rows], positions[rows], inv, False, inverse)
        for name, a, b, x in zip("qk", got, want, (q, k)):
            err = ((a[rows].float() - b.float()).abs().max() / x[rows].float().abs().max()).item()
            assert err <= TOL, f"{{what}} {{name}}: relative error {{err}} > {{TOL}}"
        return got

    def fill(t, seed):  # in place: no float32 temporary of a 4 GB tensor
        t.normal_(generator=torch.Generator(device).manual_seed(seed))

    if full:
        # Every row of MHA views into a fused QKV [s, b, heads, 3 * d] of more than 2^31 elements.
        heads, dim, batch = 32, 128, 2
        rows = 2 ** 31 // (batch * heads * 3 * dim) + 2048
        qkv = torch.empty(rows, batch, heads, 3 * dim, dtype=torch.bfloat16, device=device)
        fill(qkv, 0)
        assert qkv.numel() > 2 ** 31
        ends = torch.cat([torch.arange(16), torch.arange(rows - 256, rows)]).to(device)
        compare(qkv[..., :dim], qkv[..., dim : 2 * dim], ends, False, "fused QKV views")
        del qkv
        # A contiguous tensor (the backward's gradient) of more than 2^31 elements: the output offsets too.
        x = torch.empty(2 ** 31 // (heads * dim) + 2048, 1, heads, dim, dtype=torch.bfloat16, device=device)
        fill(x, 1)
        k = x[:, :, :4]  # any k; four groups of eight heads
        ends = torch.arange(x.size(0) - 256, x.size(0), device=device)
        compare(x, k, ends, True, "contiguous, inverse")
    else:
        # The interpreter runs one program per row: a few rows spread over a > 2^31-element base (never
        # touched, so never resident) put the same offsets in the same int32 arithmetic.
        heads, dim = 4, 32
        rows = 2 ** 31 // (heads * 3 * dim) + 64
        qkv = torch.empty(rows, 1, heads, 3 * dim, dtype=torch.bfloat16)
        spread = qkv[:: rows // 6]
        assert (spread.size(0) - 1) * spread.stride(0) + spread[0].numel() > 2 ** 31
        q, k = spread[..., :dim], spread[..., dim : 2 * dim]
        fill(q, 0), fill(k, 1)
        every = torch.arange(q.size(0))
        for inverse in (False, True):
            compare(q, k, every, inverse, f"strided views, inverse={{inverse}}")
    print("ok")
    """
)


def test_triton_offsets_past_2_to_the_31_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", LARGE.format(device="cpu", full=False)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, f"exit {done.returncode}: {done.stderr[-3000:]}"


@pytest.mark.gpu
def test_triton_offsets_past_2_to_the_31_on_gpu():
    # About 9 GB of GPU memory at the peak (a 4.3 GB bf16 tensor and its rotated copy).
    done = subprocess.run([sys.executable, "-c", LARGE.format(device="cuda", full=True)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, f"exit {done.returncode}: {done.stderr[-3000:]}"

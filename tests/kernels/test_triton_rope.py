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

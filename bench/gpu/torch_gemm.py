"""PyTorch's time for the products of a Transformer++ step (the shapes of
kernels/examples/gemm_tune.rs): y = x Wᵀ, dx = dy W, dW = dyᵀ x in bf16, as autocast runs them."""
import torch
torch.manual_seed(0)
def t(f, reps=10):
    f(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): f()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / reps
for depth, micro in [(8, 8), (16, 4)]:
    n = 128 * depth; inner = 4 * n; qkv = (depth + 2 * (depth // 4)) * 128; rows = micro * 4096
    total = 0.0
    for name, i, o, count in [("qkv", n, qkv, depth), ("proj", n, n, depth), ("w1", n, 2 * inner, depth), ("w3", inner, n, depth), ("head", n, 32000, 1)]:
        x = torch.randn(rows, i, device="cuda", dtype=torch.bfloat16) * 0.03
        w = torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.03
        dy = torch.randn(rows, o, device="cuda", dtype=torch.bfloat16) * 0.03
        for what, f in [("fwd", lambda: x @ w.t()), ("dx", lambda: dy @ w), ("dW", lambda: dy.t() @ x)]:
            ms = t(f); total += ms * count
            print(f"d{depth:<2} {name} {what} (x{count}) {ms:.4f} ms  {2*rows*i*o/ms/1e9:.0f} TFLOP/s")
        del x, w, dy
    print(f"d{depth} step GEMMs (torch bf16): {total:.2f} ms")

"""Where PyTorch + torch.compile spends a Transformer++ step: kernel times from torch.profiler.

Runs the model of torch_ref.py unchanged (its source up to the benchmark loop is executed
here, so the two cannot drift apart) and prints, per step, the CUDA time of each kernel
class and the top kernels. Usage (GPU machine):
    python3 bench/gpu/torch_profile.py gpu-carry/torch_ref.py --depth 8 --micro 8
With --ncu-step it instead runs one step between cudaProfilerStart/Stop after the warm-up
steps, for `ncu --profile-from-start off` (bench/gpu/gemm_names.sh).
"""
import argparse, collections, re, sys, time

p = argparse.ArgumentParser()
p.add_argument("torch_ref")
p.add_argument("--depth", type=int, default=8)
p.add_argument("--micro", type=int, default=8)
p.add_argument("--ctx", type=int, default=4096)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--top", type=int, default=25)
p.add_argument("--ncu-step", action="store_true")
a = p.parse_args()

src = open(a.torch_ref).read()
model_src = src[: src.index("res = []")]  # classes and helpers; the loop starts there
sys.argv = ["torch_ref.py"]  # its argparse sees no flags
ns = {"__name__": "torch_ref"}
exec(compile(model_src, a.torch_ref, "exec"), ns)
torch = ns["torch"]

torch.manual_seed(0)
m = ns["GPT"](a.depth, T=a.ctx).cuda()
opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
f = torch.compile(m)
idx = torch.randint(0, 32000, (a.micro, a.ctx), device="cuda")
tgt = torch.randint(0, 32000, (a.micro, a.ctx), device="cuda")

def step():
    with torch.autocast("cuda", torch.bfloat16):
        loss = f(idx, tgt)
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)

for _ in range(3):
    step()
torch.cuda.synchronize()
if a.ncu_step:
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    sys.exit(0)
t = time.perf_counter()
for _ in range(a.steps):
    step()
torch.cuda.synchronize()
wall = (time.perf_counter() - t) / a.steps * 1e3

from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()

def kind(name):
    n = name.lower()
    if re.search(r"flash|fmha|sdpa|attention|cudnn", n): return "attention"
    if re.search(r"gemm|nvjet|cutlass|xmma|sm90_|cublas", n): return "gemm"
    if re.search(r"adam|multi_tensor|foreach", n): return "optimizer"
    if n.startswith("triton"): return "triton (fused elementwise/norm/loss)"
    return "other"

per_kind = collections.Counter()
per_kernel = collections.Counter()
calls = collections.Counter()
for e in prof.key_averages():
    us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
    if us <= 0 or e.key.startswith("ProfilerStep"):
        continue
    per_kind[kind(e.key)] += us
    per_kernel[e.key] += us
    calls[e.key] += e.count
total = sum(per_kind.values())
print(f"PyTorch d{a.depth} micro {a.micro} ctx {a.ctx}: wall {wall:.2f} ms/step, kernels {total / a.steps / 1e3:.2f} ms/step")
for k, us in per_kind.most_common():
    print(f"  {k:40s} {us / a.steps / 1e3:8.2f} ms/step")
print("top kernels (ms/step, calls/step):")
for k, us in per_kernel.most_common(a.top):
    print(f"  {us / a.steps / 1e3:8.3f}  {calls[k] / a.steps:5.0f}  {k[:110]}")

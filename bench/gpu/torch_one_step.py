"""One Transformer++ step of torch_ref.py's model between cudaProfilerStart/Stop, after three
warm-up steps, so that `ncu --profile-from-start off` sees exactly one step's kernels.
Usage (GPU machine): ncu --profile-from-start off ... python3 bench/gpu/torch_one_step.py
    gpu-carry/torch_ref.py --depth 16 --micro 4
"""
import argparse, sys

p = argparse.ArgumentParser()
p.add_argument("torch_ref")
p.add_argument("--depth", type=int, default=16)
p.add_argument("--micro", type=int, default=4)
p.add_argument("--ctx", type=int, default=4096)
a = p.parse_args()

src = open(a.torch_ref).read()
sys.argv = ["torch_ref.py"]
ns = {"__name__": "torch_ref"}
exec(compile(src[: src.index("res = []")], a.torch_ref, "exec"), ns)
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
torch.cuda.cudart().cudaProfilerStart()
step()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("one step done")

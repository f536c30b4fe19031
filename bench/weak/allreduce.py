# NCCL all-reduce bus bandwidth (nccl-tests definition: busbw = 2(n-1)/n * bytes / time),
# fp32, torch.distributed; run with: python3 -m torch.distributed.run --nproc_per_node N allreduce.py
import os, time, torch, torch.distributed as dist
dist.init_process_group("nccl"); r = dist.get_rank(); n = dist.get_world_size()
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
for mib in (256, 2048):
    x = torch.randn(mib * 2**20 // 4, device="cuda")
    for _ in range(3): dist.all_reduce(x)
    torch.cuda.synchronize(); t = time.perf_counter(); it = 10
    for _ in range(it): dist.all_reduce(x)
    torch.cuda.synchronize(); dt = (time.perf_counter() - t) / it
    if r == 0: print(f"allreduce n={n} {mib} MiB fp32: {dt*1e3:.2f} ms, busbw {2*(n-1)/n*x.numel()*4/dt/1e9:.1f} GB/s", flush=True)
dist.destroy_process_group()

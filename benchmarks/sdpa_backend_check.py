"""Decode step with cuDNN SDPA on and off (GPU): the check behind change 1 in
docs/benchmarks/throughput.md. Run: ``python benchmarks/sdpa_backend_check.py`` on a CUDA machine."""
import sys, torch
sys.path.insert(0, "benchmarks")
import throughput as tp
model = tp.build_model("llama2-7b", "cuda", torch.bfloat16)
for cudnn in (True, False):
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    for policy in ("pyramidinfer", "h2o", "full"):
        tp.run_once(model, policy, 8, 512, 4, "cuda")
        r = tp.run_once(model, policy, 8, 512, 12, "cuda")
        print("cudnn", cudnn, policy, round(r["decode_step_ms"], 1), flush=True)

"""The benchmark behind `directpo bench`: directpo against TRL's DPOTrainer on the same model,
pairs and hardware, each run in its own subprocess.

    runner   what is compared and how it is measured: the pairs, the child processes, rounds, the sweep
    child    one measurement inside its subprocess (`python -m directpo.bench --child SPEC`)
    trl      the TRL side (TRL is imported only there, lazily)
    flops    model shapes, the model-FLOP count, the matmul peak probe, the bf16 decision
    report   per-run summaries, medians, the directpo vs TRL comparison, the printed table
    onednn   how much oneDNN's primitive caches keep as matmul shapes change (`python -m directpo.bench.onednn`)
"""
from .runner import run_bench

__all__ = ["run_bench"]

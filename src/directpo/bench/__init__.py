"""The benchmark behind `directpo bench`: directpo against TRL's DPOTrainer on the same model,
pairs and hardware, each run in its own subprocess.

    runner   what is compared and how it is measured: the pairs, the child processes, rounds, the sweep
    child    one measurement inside its subprocess (`python -m directpo.bench --child SPEC`)
    trl      the TRL side (TRL is imported only there, lazily)
    fairness what both sides share: directpo's RMSprop settings, the RSS baseline once imported
    end_to_end  `--end-to-end`: the whole `directpo train` command against TRL's script, by phase
             (each started as a file: e2e_directpo.py, e2e_trl.py)
    flops    model shapes, the model-FLOP count, the matmul peak probe, the bf16 decision
    report   per-run summaries, medians, the directpo vs TRL comparison, the printed table
    onednn   how much oneDNN's primitive caches keep as matmul shapes change (`python -m directpo.bench.onednn`)
"""
from .runner import run_bench

__all__ = ["run_bench"]

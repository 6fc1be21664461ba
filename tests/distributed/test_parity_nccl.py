"""Tier 3: the parity cases on 2 GPUs with NCCL in bf16 (skipped without two GPUs)."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_group
from tests.distributed.parity import TOL_BF16, Case, run_cases

CASES = [
    Case("llama", batch=1, seq=256, compiler="inductor", dtype="bfloat16"),
    Case("llama", batch=2, seq=255, labels="spans", compiler="aot_eager", dtype="bfloat16"),
    Case("llama_kv1", batch=1, seq=129, labels="rank_masked", compiler="aot_eager", dtype="bfloat16"),
    Case("qwen2", batch=1, seq=200, outputs="dtensor", compiler="inductor", dtype="bfloat16"),
    Case("qwen3", batch=1, seq=128, compiler="aot_eager", dtype="bfloat16"),
    Case("mistral", batch=1, seq=130, compiler="aot_eager", dtype="bfloat16"),
    Case("gpt2", batch=2, seq=127, labels="spans", compiler="inductor", dtype="bfloat16"),
    Case("plain", batch=1, seq=131, compiler="inductor", dtype="bfloat16", seqs=(200,)),
    Case("llama", batch=1, seq=256, compiler="aot_eager", dtype="bfloat16", mode="eval", labels="none"),
    Case("llama", batch=1, seq=64, compiler="inductor", dtype="float32"),
]


@pytest.fixture(scope="module")
def results():
    per_rank = run_group(2, run_cases, CASES, timeout=1200, backend="nccl")
    return {r["case"]: [per_rank[k][i] for k in range(2)] for i, r in enumerate(per_rank[0])}


@pytest.mark.multigpu
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parity_nccl(results, case):
    tol = TOL_BF16 if case.dtype == "bfloat16" else {"loss": 1e-4, "logits": 1e-3, "grad": 1e-3}
    for r in results[case.id]:
        print(r)
        assert "error" not in r, r.get("error")
        assert r["logits"] <= tol["logits"], r
        if "loss" in r:
            assert r["loss"] <= tol["loss"], r
        if "grad" in r:
            assert r["grad"] <= tol["grad"], r

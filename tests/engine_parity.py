"""Scores the same sequences with vLLM (tensor path and public FlatLogprobs path)
and with transformers, and saves the arrays for tests/test_engines.py.

Run in a subprocess (vLLM needs a __main__ guard and may abort at interpreter
exit): ``python tests/engine_parity.py TEACHER OUT.npz``.
"""

import os
import sys

import numpy as np


def main() -> None:
    teacher, out = sys.argv[1], sys.argv[2]
    from hpd_tools.engines.hf import HFTeacher
    from hpd_tools.engines.vllm import VLLMTeacher

    rng = np.random.default_rng(0)
    k = 16
    # One sequence longer than the engine's batch budget, so vLLM prefills it in chunks.
    lengths = [5, 37, 180, 300]
    seqs = [rng.integers(3, 1000, n).astype(np.int64) for n in lengths]
    vllm = VLLMTeacher(teacher, k=k, max_length=512, engine_args={"enforce_eager": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 128, "max_num_seqs": 4})
    fast = vllm.score(seqs, k)
    vllm.tensor_logprobs = False
    flat = vllm.score(seqs, k)
    used_tensor_path = vllm.llm is not None and hasattr(__import__("vllm.v1.engine.logprobs", fromlist=["x"]).LogprobsProcessor, "_hpd_tensor_mode")
    vllm.close()
    hf = HFTeacher(teacher, batch_tokens=256).score(seqs, k)
    arrays = {"lengths": np.array(lengths), "tensor_path": np.array(used_tensor_path)}
    for name, scored in (("fast", fast), ("flat", flat), ("hf", hf)):
        for i, sc in enumerate(scored):
            arrays[f"{name}_{i}_label"] = sc.label_logprob
            arrays[f"{name}_{i}_ids"] = sc.topk_ids
            arrays[f"{name}_{i}_lp"] = sc.topk_logprobs
    np.savez(out, **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

"""Scores with one in-process vLLM engine of a teacher and saves the arrays, for the
session fixture ``vllm_scores`` (tests/conftest.py) that tests/test_engines.py and
tests/test_onpolicy_server.py share: one engine start for both.

- the same sequences through vLLM's tensor path, its public FlatLogprobs path and
  transformers (tests/test_engines.py);
- rollouts the student samples, scored by vLLM in process, for comparison with a
  running vLLM server (tests/test_onpolicy_server.py).

Run in a subprocess (vLLM needs a __main__ guard and may abort at interpreter
exit): ``python tests/engine_parity.py TEACHER STUDENT OUT.npz``.
"""

import os
import sys

import numpy as np


def main() -> None:
    teacher, student, out = sys.argv[1:4]
    import torch
    from transformers import AutoModelForCausalLM

    from hpd_tools.engines.hf import HFTeacher
    from hpd_tools.engines.vllm import VLLMTeacher

    rng = np.random.default_rng(0)
    k = 16
    # One sequence longer than the engine's batch budget, so vLLM prefills it in chunks.
    lengths = [5, 37, 180, 300]
    seqs = [rng.integers(3, 1000, n).astype(np.int64) for n in lengths]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    prompts = [torch.tensor([[1, 5 + i, 40 + 3 * i, 200 + i]]) for i in range(4)]
    rollouts = [model.generate(p, do_sample=True, max_new_tokens=20, top_k=0, pad_token_id=0)[0].numpy() for p in prompts]
    vllm = VLLMTeacher(teacher, k=k, max_length=512, engine_args={"enforce_eager": True, "enable_chunked_prefill": True, "max_num_batched_tokens": 128, "max_num_seqs": 4})
    fast = vllm.score(seqs, k)
    scored_rollouts = vllm.score(rollouts, k)
    vllm.tensor_logprobs = False
    flat = vllm.score(seqs, k)
    used_tensor_path = vllm.llm is not None and hasattr(__import__("vllm.v1.engine.logprobs", fromlist=["x"]).LogprobsProcessor, "_hpd_tensor_mode")
    vllm.close()
    hf = HFTeacher(teacher, batch_tokens=256).score(seqs, k)
    arrays = {"lengths": np.array(lengths), "tensor_path": np.array(used_tensor_path), "rollouts": np.array(len(rollouts))}
    for name, scored in (("fast", fast), ("flat", flat), ("hf", hf), ("rollout", scored_rollouts)):
        for i, sc in enumerate(scored):
            arrays[f"{name}_{i}_label"] = sc.label_logprob
            arrays[f"{name}_{i}_ids"] = sc.topk_ids
            arrays[f"{name}_{i}_lp"] = sc.topk_logprobs
    for i, r in enumerate(rollouts):
        arrays[f"rollout_{i}"] = r
    np.savez(out, **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

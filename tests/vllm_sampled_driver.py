"""Sampled scoring with an in-process vLLM engine, for tests/test_vllm_sampled.py.

Run in a subprocess (vLLM needs a __main__ guard and may abort at interpreter exit):
``python tests/vllm_sampled_driver.py TEACHER SEQS.npz OUT.npz [spawned]``. SEQS.npz holds
``seq_<i>`` token arrays, ``seeds`` and ``samples``. Scores them three ways (all at
once; again; reversed in two batches, one of a single sequence), each with chunked
prefill (128 batched tokens), then checks the two refusals: the tensor path off,
and a model runner without the sampling hook. With ``spawned`` (the engine core in
a process of its own, as on GPUs) it scores them once.
"""

import os
import sys

import numpy as np


def save(arrays: dict, name: str, scored: list) -> None:
    for i, sc in enumerate(scored):
        arrays[f"{name}_{i}_label"] = sc.label_logprob
        arrays[f"{name}_{i}_ids"] = sc.topk_ids
        arrays[f"{name}_{i}_lp"] = sc.topk_logprobs
        arrays[f"{name}_{i}_counts"] = sc.sample_counts


def refusal(call) -> str:
    from hpd_tools.errors import HPDError

    try:
        call()
    except HPDError as exc:
        return str(exc)
    return ""


def main() -> None:
    teacher, seqs_path, out = sys.argv[1:4]
    from hpd_tools.engines.vllm import VLLMTeacher

    data = np.load(seqs_path)
    seqs = [data[f"seq_{i}"] for i in range(len(data["seeds"]))]
    seeds = [int(s) for s in data["seeds"]]
    n = int(data["samples"])
    vllm = VLLMTeacher(teacher, k=8, max_length=512, engine_args={"enforce_eager": True, "enable_chunked_prefill": True,
                                                                   "max_num_batched_tokens": 128, "max_num_seqs": 4})
    arrays: dict = {}
    save(arrays, "a", vllm.score(seqs, 8, samples=n, seeds=seeds))
    if sys.argv[4:] == ["spawned"]:  # the engine core in a spawned process: the draws alone
        vllm.close()
        np.savez(out, **arrays)
        sys.stdout.flush()
        os._exit(0)
    save(arrays, "b", vllm.score(seqs, 8, samples=n, seeds=seeds))
    order = list(range(len(seqs)))[::-1]
    first = vllm.score([seqs[order[0]]], 8, samples=n, seeds=[seeds[order[0]]])
    rest = vllm.score([seqs[i] for i in order[1:]], 8, samples=n, seeds=[seeds[i] for i in order[1:]])
    back = [None] * len(seqs)
    for i, sc in zip(order, first + rest):
        back[i] = sc
    save(arrays, "c", back)
    if "data" in data.files:  # a sampled cache through the real writer with this engine
        from hpd_tools.cache import CacheConfig, build_cache

        build_cache(CacheConfig(teacher=teacher, data=str(data["data"]), engine="vllm", signal="sampled", samples=n, out=str(data["cache_out"]),
                                chunk_tokens=512, max_length=256, reuse=False), teacher=vllm)
    topk = vllm.score(seqs[:1], 8)  # top-k beside sampled requests on the same engine
    arrays["topk_ids"], arrays["topk_lp"] = topk[0].topk_ids, topk[0].topk_logprobs

    vllm.tensor_logprobs = False
    arrays["refused_tensor_path"] = np.array(refusal(lambda: vllm.score(seqs[:1], 8, samples=n, seeds=seeds[:1])))
    vllm.tensor_logprobs = True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    hooked = GPUModelRunner._get_prompt_logprobs_dict
    GPUModelRunner._get_prompt_logprobs_dict = hooked.__wrapped__  # a runner without the hook: vLLM's top-k comes back
    arrays["refused_no_hook"] = np.array(refusal(lambda: vllm.score(seqs[:1], 8, samples=n, seeds=seeds[:1])))
    GPUModelRunner._get_prompt_logprobs_dict = hooked
    arrays["version"] = np.array(vllm.version)
    vllm.close()
    np.savez(out, **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

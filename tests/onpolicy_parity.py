"""Scores the same student rollouts with an in-process vLLM teacher and with a
running vLLM server, for tests/test_onpolicy_server.py.

    python tests/onpolicy_parity.py TEACHER STUDENT URL OUT.npz
"""

import os
import sys

import numpy as np


def main() -> None:
    teacher, student, url, out = sys.argv[1:5]
    import torch
    from transformers import AutoModelForCausalLM

    from hpd_tools.engines.server import ServerTeacher
    from hpd_tools.engines.vllm import VLLMTeacher

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    prompts = [torch.tensor([[1, 5 + i, 40 + 3 * i, 200 + i]]) for i in range(4)]
    rollouts = [model.generate(p, do_sample=True, max_new_tokens=20, top_k=0, pad_token_id=0)[0].numpy() for p in prompts]
    k = 16
    inproc = VLLMTeacher(teacher, k=k, max_length=512, engine_args={"enforce_eager": True})
    a = inproc.score(rollouts, k)
    inproc.close()
    b = ServerTeacher(url).score(rollouts, k)
    arrays = {}
    for i, (x, y) in enumerate(zip(a, b)):
        arrays.update({f"a{i}_label": x.label_logprob, f"a{i}_lp": x.topk_logprobs, f"a{i}_ids": x.topk_ids,
                       f"b{i}_label": y.label_logprob, f"b{i}_lp": y.topk_logprobs, f"b{i}_ids": y.topk_ids})
    np.savez(out, n=np.array(len(rollouts)), **arrays)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

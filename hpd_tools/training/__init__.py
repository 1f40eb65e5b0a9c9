"""The pieces of ``hpd-tools distill`` (``hpd_tools.distill.train`` runs them):

- ``config``: ``DistillConfig``, its checks, the schedule and precision;
- ``student``: loading the student, one micro-batch's targets, the chunked loss;
- ``state``: ``Training``, one run's state with ``resume``, ``train_step``, ``save``;
- ``checkpoint``: step-N/ folders written, pruned and read back;
- ``run_folder``: what ``--out`` may be, its marker, resume checks;
- ``evaluation``: held-out forward KL and NLLs;
- ``metrics``: metrics.jsonl and TensorBoard.
"""

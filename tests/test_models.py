"""Making students and teachers: depth pruning."""

from __future__ import annotations

from conftest import run_cli


def test_prune_keeps_chosen_layers(teacher, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    proc = run_cli("prune", "--teacher", str(teacher), "--keep", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    student = AutoModelForCausalLM.from_pretrained(out)
    full = AutoModelForCausalLM.from_pretrained(teacher)
    assert student.config.num_hidden_layers == 1
    torch.testing.assert_close(student.model.layers[0].mlp.up_proj.weight, full.model.layers[1].mlp.up_proj.weight)
    torch.testing.assert_close(student.lm_head.weight, full.lm_head.weight)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.isfinite(student(ids).logits).all()
    bad = run_cli("prune", "--teacher", str(teacher), "--keep", "0,7", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "between 0 and 1" in bad.stderr

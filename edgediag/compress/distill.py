"""Knowledge distillation while fine-tuning a pruned model: the unpruned model teaches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Distilled:
    """Adds ``weight`` x the mean, over the exported outputs whose shapes match (scores,
    class scores/logits, embeddings), of the student's MSE to the frozen teacher relative
    to the teacher's mean square, to the model's own loss. Relative, so each output counts
    alike whatever its scale (ArcFace class scores are ~100x an embedding's entries).
    Installed on the instance, removed before saving."""

    def __init__(self, model, teacher, weight: float):
        self.model, self.teacher, self.weight = model, teacher.eval(), float(weight)
        self.original = model.training_step
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def __call__(self, batch, phase="main"):
        out = self.original(batch, phase)
        if phase != self.model.phases[-1]:
            return out
        x = batch["x"]
        with torch.no_grad():
            t_out = self.teacher.export_module()(x)
        s_out = self.model.export_module()(x)
        t_out = t_out if isinstance(t_out, (tuple, list)) else (t_out,)
        s_out = s_out if isinstance(s_out, (tuple, list)) else (s_out,)
        terms = [F.mse_loss(s.float(), t.float()) / t.float().pow(2).mean().clamp_min(1e-8)
                 for s, t in zip(s_out, t_out) if s.shape == t.shape]
        if terms:
            kd = torch.stack(terms).mean()
            out = {**out, "loss": out["loss"] + self.weight * kd, "distill": kd.detach()}
        return out

    def install(self):
        self.model.training_step = self

    def remove(self):
        self.model.__dict__.pop("training_step", None)


__all__ = ["Distilled"]

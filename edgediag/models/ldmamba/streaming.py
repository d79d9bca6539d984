"""The causal LDMamba stepped one frame at a time (``LDMamba.streaming_module()``)."""

from __future__ import annotations

import torch
from torch import nn

from edgediag.models.ldmamba.screening import causal_conv_step


class LDMambaStreaming(nn.Module):
    """The causal LDMamba one frame at a time: ``(x_t (B, F), *states) -> (score, probs,
    embedding, *new_states)``; the outputs at step t are those of the full model on frames
    0..t (:meth:`full_sequence` computes them all at once, the export's parity reference).

    States (zeros at the start): each stem conv's last k-1 inputs, per block the Mamba conv
    and SSM states, the running sums of the static branch and of the screen's scores and the
    screen conv's inputs, the head's running sum and max of the tokens, and the step count.
    """

    def __init__(self, model: nn.Module):  # an LDMamba (typed loosely: model.py imports this)
        super().__init__()
        self.model = model
        self.method, self.k = model.active_score_method(), model.knn_neighbours()
        self.state_names = [name for name, _ in self._state_shapes(1)]
        self.input_names = ["x_t", *self.state_names]
        self.output_names = ["score", "probs", "embedding", *[f"new_{n}" for n in self.state_names]]
        self.train(model.training)

    def _state_shapes(self, batch: int) -> list[tuple[str, tuple[int, ...]]]:
        m = self.model
        shapes = [(f"stem{i}", (batch, conv.in_channels, conv.kernel_size[0] - 1))
                  for i, conv in enumerate(m.stem_convs)]
        for b, block in m.present_blocks():
            shapes += [(f"block{b}_{k}", v) for k, v in block.state_shapes(batch).items()]
        d = m.config.d_model
        return shapes + [("head_sum", (batch, d)), ("head_max", (batch, d)), ("count", (batch, 1))]

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        x_t = self.model.example_input(batch_size)[:, 0].float()
        dev = self.model.in_mean.device
        return (x_t, *[torch.zeros(shape, device=dev) for _, shape in self._state_shapes(batch_size)])

    def forward(self, x_t: torch.Tensor, *states: torch.Tensor):
        m = self.model
        st = dict(zip(self.state_names, states))
        n = st["count"] + 1.0
        new: dict[str, torch.Tensor] = {"count": n}
        h = m.normalise(x_t.float())
        for i, (conv, bn) in enumerate(zip(m.stem_convs, m.stem_norms)):
            h, new[f"stem{i}"] = causal_conv_step(conv, st[f"stem{i}"], h)
            h = m._stem_act(i, bn(h), dim=1)
        for b, block in m.present_blocks():
            prefix = f"block{b}_"
            h, block_state = block.step(h, n, {k[len(prefix):]: v for k, v in st.items() if k.startswith(prefix)})
            new.update({prefix + k: v for k, v in block_state.items()})
        h = m.norm(h)
        new["head_sum"] = st["head_sum"] + h
        # the running max starts at the first token (the zero initial state is not a token)
        new["head_max"] = torch.where(st["count"] > 0, torch.maximum(st["head_max"], h), h)
        emb = m._head(torch.cat([new["head_sum"] / n, new["head_max"]], dim=-1))
        logits = m.classifier(emb)
        score = m.scores_from(emb, logits, self.method, self.k)
        return (score, logits.softmax(dim=-1), emb, *[new[name] for name in self.state_names])

    def full_sequence(self, xs: torch.Tensor):
        """Per-step outputs (B, T, ...) of the full-sequence (causal) forward, at once."""
        m = self.model
        h, _ = m._tokens(xs)
        n = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
        pooled = torch.cat([h.cumsum(dim=1) / n, h.cummax(dim=1).values], dim=-1)  # (B, T, 2d)
        B, T = pooled.shape[:2]
        emb = m._head(pooled.reshape(B * T, -1))
        logits = m.classifier(emb)
        score = m.scores_from(emb, logits, self.method, self.k)
        return score.view(B, T), logits.softmax(dim=-1).view(B, T, -1), emb.view(B, T, -1)


# --- the CNN baseline ---------------------------------------------------------------------


__all__ = ["LDMambaStreaming"]

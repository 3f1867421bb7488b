"""Embedding lookups whose backward adds the batch's gradient rows into a kept buffer (model.table_grad_accumulate).

Autograd's own path, per micro-batch and table: the backward fills a dense gradient of the whole table with zeros,
scatters the batch's rows into it, and AccumulateGrad adds that to the gradient kept from the earlier
micro-batches: three passes over the table (the bigram table is 377,280 x 768) for at most one row per token.
Here the backward adds the rows into a buffer kept beside the table (`index_add_` in a custom op, which Inductor
calls in place on the buffer), and `GPT.attach_table_grads` makes that buffer the parameter's `.grad`, so the
cross-rank sum, the tie fold and the optimisers see a gradient as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("speedrun::add_rows", mutates_args=("kept",))
def add_rows(kept: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor) -> None:
    """kept[rows[i]] += grad[i] for every position i (repeated rows add up)."""
    kept.index_add_(0, rows.reshape(-1), grad.reshape(-1, grad.size(-1)).to(kept.dtype))


class _AccumulatingEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.kept = kept  # not saved for backward: a table looked up twice in a forward mutates it twice
        return F.embedding(rows, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (rows,) = ctx.saved_tensors
        add_rows(ctx.kept, rows, grad)
        return None, None, None


def lookup(table: torch.nn.Embedding, rows: torch.Tensor) -> torch.Tensor:
    """table(rows); where the table keeps a gradient buffer (`grad_kept`), its backward adds into that."""
    kept = getattr(table, "grad_kept", None)
    return F.embedding(rows, table.weight) if kept is None else _AccumulatingEmbedding.apply(rows, table.weight, kept)

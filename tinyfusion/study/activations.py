"""Per-block statistics of a model's hidden states, counted batch by batch in float64: extreme
activations (largest |h|, std) and the share of entries Masked KD's outlier mask removes
(diffusion.distillation.outlier_mask, the very mask the distillation loss applies). Used by
visualize_activation.py (its figures and JSON) and by the study (measure.activation_statistics)."""
import torch
from tqdm import tqdm

from diffusion.distillation import outlier_mask


class BlockStatistics:
    """Running statistics of one block's hidden states over batches: entry count, sum and sum of
    squares, min, max, the `topk` largest |h|, the entries the mask of k = `mask_sigma` removes
    and, given bin `edges`, a histogram (two open-ended bins beyond the first and last edge)."""

    def __init__(self, mask_sigma, topk=1, edges=None):
        self.edges = None if edges is None else torch.as_tensor(edges, dtype=torch.float64)
        self.counts = None if edges is None else torch.zeros(len(edges) + 1, dtype=torch.int64)
        self.topk, self.mask_sigma = topk, mask_sigma
        self.entries, self.masked, self.total, self.total_sq = 0, 0, 0.0, 0.0
        self.low, self.high, self.top = float("inf"), float("-inf"), torch.zeros(0, dtype=torch.float64)

    def add(self, hidden):
        h = hidden.detach().to("cpu", torch.float64).flatten(1)  # (B, T*D)
        self.entries += h.numel()
        self.total += float(h.sum())
        self.total_sq += float((h * h).sum())
        self.low, self.high = min(self.low, float(h.min())), max(self.high, float(h.max()))
        self.top = torch.cat([self.top, h.abs().flatten()]).topk(min(self.topk, self.top.numel() + h.numel())).values
        if self.edges is not None:
            self.counts += torch.bincount(torch.bucketize(h.flatten(), self.edges), minlength=len(self.counts))
        self.masked += int((outlier_mask(h, self.mask_sigma) == 0).sum())

    def summary(self, index):
        mean = self.total / self.entries
        std = max(self.total_sq / self.entries - mean * mean, 0.0) ** 0.5
        return dict(block=index, entries=self.entries, min=self.low, max=self.high, mean=mean, std=std,
                    topk_abs=self.top.tolist(), masked_share=self.masked / self.entries)


def every_block_output(model, x_t, t, y):
    """The output of every block of a model called as model(x_t, t, y) (DiT, SiT)."""
    return model(x_t, t, y, hidden_indices=list(range(model.depth)))[1]


@torch.no_grad()
def block_statistics(model, x_t, t, y, *, batch_size, mask_sigma, topk=1, edges=None, progress=False,
                     forward=every_block_output):
    """One BlockStatistics per block of `model` over the inputs (x_t, t, y), run in batches of
    `batch_size` on the model's device; forward(model, x_t, t, y) gives every block's output (a
    family's activation_forward: x_t, t are what its activation_inputs returned)."""
    device = next(model.parameters()).device
    stats = [BlockStatistics(mask_sigma, topk, edges) for _ in range(model.depth)]
    starts = range(0, len(x_t), batch_size)
    for start in tqdm(starts, desc="activations", unit="batch") if progress else starts:
        batch = slice(start, start + batch_size)
        hiddens = forward(model, x_t[batch].to(device), t[batch].to(device), y[batch].to(device))
        for block_stats, hidden in zip(stats, hiddens):
            block_stats.add(hidden)
    return stats

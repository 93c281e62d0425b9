"""The BI score (ShortGPT's Block Influence, the paper's score baseline) and its calibration data:
how similar each block's output is to its input on real latents, the blocks that change them
least removed first. A new pruning criterion is a function of the same shape (model and
calibration inputs -> one score per block) beside `bi_scores`, and its choice rule beside
`select_by_bi_score`; prune_by_score.py calls them."""
import torch
import torch.nn.functional as F

from tinyfusion.errors import TinyFusionError
from tinyfusion.flags import CALIBRATIONS  # the --calibration choices, listed there so that --help needs no torch
from tinyfusion.io.checkpoints import check_data_fits


# ----------------------------------------------------------------------- BI score
@torch.no_grad()
def block_input_output_similarity(model, run_model):
    """(depth,) sum over the batch of each block's cosine similarity between its input and output
    hidden states (over channels, averaged over tokens), read with forward hooks while
    `run_model()` calls the model, so it measures exactly what the model's own forward computes."""
    sums = torch.zeros(model.depth, dtype=torch.float64)

    def make_hook(index):
        def hook(module, inputs, output):
            similarity = F.cosine_similarity(inputs[0].float(), output.float(), dim=-1)  # (B, T)
            sums[index] += similarity.mean(dim=1).double().sum().cpu()
        return hook

    handles = [block.register_forward_hook(make_hook(index)) for index, block in enumerate(model.gated_blocks())]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    return sums


@torch.no_grad()
def bi_scores(model, latents, labels, *, family, calibration="clean", num_timesteps=250, batch_size=16, seed=0,
              progress=False):
    """Per-block mean input/output cosine similarity (ShortGPT's Block Influence is 1 minus it)
    over calibration `latents` (N, C, H, W) with their true `labels`, in eval mode.

    - "clean" (the original TinyFusion procedure): the latents as they are, with per batch
      t ~ U{0..num_timesteps-1} (the original draws t below the respaced step count, 250 by
      default) passed directly to the model.
    - "noised" (our variant): x_t = q_sample(latents, t, noise) with t ~ U{0..999} on the
      1000-step process, the model seeing the noisy input it sees when sampling.

    Per batch of `batch_size`: similarity over channels, averaged over tokens and samples; the
    result is the mean over batches. t (and, noised, then the noise) of each batch are drawn
    in that order from a CPU generator seeded with `seed`.

    `family` (tinyfusion.families) draws the inputs: the above for a DiT; a SiT is calibrated only
    "noised", on its own interpolant: per batch (t, x0) = transport.sample_time_and_noise(generator)
    (t uniform on the training interval), x_t = alpha_t x1 + sigma_t x0, the model called with that
    t in [0, 1]. A MAR sees its clean tokens with a training mask drawn from the generator."""
    from tqdm import tqdm
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; use one of {', '.join(CALIBRATIONS)}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    batch_means = []
    for start in tqdm(range(0, len(latents), batch_size), disable=not progress, desc="BI score"):
        x = latents[start:start + batch_size].float()
        y = labels[start:start + batch_size]
        sums = block_input_output_similarity(model, lambda: family.calibration_forward(
            model, x, y, generator, calibration=calibration, num_timesteps=num_timesteps))
        batch_means.append(sums / len(x))
    model.train(was_training)
    return torch.stack(batch_means).mean(dim=0).tolist()


def select_by_bi_score(similarities, n_pruned):
    """Sorted kept indices after removing the `n_pruned` blocks whose output is most similar to
    their input (they change the least); the last block is never removed."""
    depth = len(similarities)
    if not 0 <= n_pruned <= depth - 1:
        raise ValueError(f"--n-pruned {n_pruned} must be between 0 and {depth - 1} for a model with {depth} blocks "
                         f"(the last block is always kept)")
    candidates = sorted(range(depth - 1), key=lambda j: (-similarities[j], j))
    removed = set(candidates[:n_pruned])
    return [j for j in range(depth) if j not in removed]


# ----------------------------------------------------------------------- calibration data
def calibration_latents(nsamples, seed, features_path=None, data_path=None, image_size=256, vae=None,
                        batch_size=16, device="cpu", random_flip=True):
    """(latents (N, C, H, W) float32 on the CPU, labels (N,)): `nsamples` random samples of a
    feature store, or of an ImageFolder center-cropped and encoded with `vae` (None = pixel
    space; a latent is latent_dist.sample() times the VAE's scaling factor, 0.18215 for the
    SD-VAE) in batches.

    From a CPU generator seeded with `seed`: the subset (randperm of the data set, first
    `nsamples`), then one horizontal-flip draw per sample (rand < 0.5) when `random_flip` (the
    original's RandomHorizontalFlip: the image is flipped before encoding; a feature store gives
    its stored flip's latent)."""
    import tinyfusion.io.vae as vae_io
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dataset, flipped = _calibration_dataset(features_path, data_path, image_size, seed)
    count = min(nsamples, len(dataset))
    order = torch.randperm(len(dataset), generator=generator)[:count].tolist()
    flips = (torch.rand(count, generator=generator) < 0.5).tolist() if random_flip else [False] * count
    latents, labels = [], []
    for start in range(0, count, batch_size):
        rows = range(start, min(start + batch_size, count))
        if features_path:
            items = [(flipped if flips[row] else dataset)[order[row]] for row in rows]
            x = torch.stack([torch.as_tensor(item[0]) for item in items]).float()
        else:
            items = [dataset[order[row]] for row in rows]
            x = torch.stack([torch.flip(item[0], dims=[-1]) if flips[row] else item[0]
                             for row, item in zip(rows, items)]).float()
            x = vae_io.encode(vae, x.to(device)).float().cpu()
        latents.append(x)
        labels.append(torch.tensor([int(item[1]) for item in items], dtype=torch.int64))
    return torch.cat(latents), torch.cat(labels)


def check_latents_fit(latents, labels, model):
    """One-line TinyFusionError when calibration latents/labels cannot feed `model` (geometry, classes)."""
    check_data_fits(model, latents.shape[1:], int(labels.max()) + 1, data="the calibration latents")


def _calibration_dataset(features_path, data_path, image_size, seed):
    """(data set, its flipped twin or None): a feature store read as stored and as its flips, or
    an ImageFolder; a one-line TinyFusionError when there is none."""
    if features_path:
        from tinyfusion.io.feature_store import open_feature_dataset
        dataset = open_feature_dataset(features_path, flip_prob=0.0, seed=seed)
        flipped = open_feature_dataset(features_path, flip_prob=1.0, seed=seed)
    elif data_path:
        from tinyfusion.io.image_folder import image_folder
        try:
            dataset, flipped = image_folder(data_path, image_size), None
        except ValueError as error:
            raise TinyFusionError(str(error)) from None
    else:
        raise TinyFusionError("calibration needs real images: pass --data-path (an ImageFolder) or --features-path")
    if len(dataset) == 0:
        raise TinyFusionError("the calibration data set is empty")
    return dataset, flipped

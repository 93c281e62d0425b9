"""Prune a DiT or a SiT by keeping a hand-picked list of blocks (e.g. the BK-SDM-style "oracle" of the
paper) and save the shallow model as a plain state dict with its metadata.

    python prune_by_index.py --model DiT-XL/2 --ckpt pretrained/DiT-XL-2-256x256.pt \
        --kept-indices "[0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]" \
        --save-model outputs/pruned/DiT-D14-Oracle.pt
"""
import argparse

from tinyfusion.flags import (add_checkpoint_args, add_compatibility_flags, add_model_args, nonnegative_float,
                            nonnegative_int, parse_index_list, positive_int)
from tinyfusion.errors import TinyFusionError, run_main


def main(args):
    # imported here, not at the top, so that `--help` and a bad flag answer without loading torch

    from tinyfusion.families import family_for_model
    from tinyfusion.pruning.pruned_models import (check_output_path, load_source_model, plain_name, save_pruned,
                                                  source_lineage, validate_kept_indices)
    if not args.ckpt:
        raise TinyFusionError("--ckpt is required: the checkpoint to prune, e.g. pretrained/DiT-XL-2-256x256.pt")
    if args.kept_indices is None:
        raise TinyFusionError("--kept-indices is required, e.g. --kept-indices \"[0, 2, 4, 6]\"")
    check_output_path(args.save_model, args.overwrite)
    model_name = plain_name(args.model)
    model, source_metadata = load_source_model(model_name, args.ckpt, args.image_size, args.num_classes, args.vae,
                                               args.vae_path, use_ema=not args.no_ema)
    try:
        kept = validate_kept_indices(args.kept_indices, model.depth)
    except ValueError as error:
        raise TinyFusionError(f"--kept-indices: {error}") from None
    metadata = dict(method="index", source_model=model_name, source_checkpoint=args.ckpt, source_depth=model.depth,
                    groups=None, confidences=None, scores=None, steps=0, **source_lineage(source_metadata, kept))
    # a SiT keeps the record of the transport it was trained with
    metadata.update(family_for_model(model_name).recorded_in(source_metadata))
    pruned = save_pruned(model, kept, args.save_model, metadata, overwrite=args.overwrite)
    print(f"kept blocks {kept} of {model.depth}; saved the {pruned.depth}-block model to {args.save_model}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_checkpoint_args(parser, help="checkpoint to prune (plain, training or pruned)")
    parser.add_argument("--kept-indices", type=parse_index_list, default=None,
                        help="blocks to keep, sorted, e.g. \"[0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]\"")
    parser.add_argument("--save-model", type=str, default="outputs/pruned/pruned-by-index.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --save-model file")
    add_compatibility_flags(parser, [  # the original's command line; pruning by index needs no data or sampling
        ("--data-path", dict(type=str, default=None)), ("--cfg-scale", dict(type=nonnegative_float, default=1.5)),
        ("--num-sampling-steps", dict(type=positive_int, default=250)), ("--seed", dict(type=nonnegative_int, default=0)),
        ("--pruner", dict(type=str, default=None)), ("--nsamples", dict(type=positive_int, default=128)),
        ("--batch-size", dict(type=positive_int, default=16))])
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

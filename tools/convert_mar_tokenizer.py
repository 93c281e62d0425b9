"""Convert MAR's KL-16 tokenizer checkpoint into a diffusers AutoencoderKL folder.

MAR (LTH14/mar) generates in the latent space of its own tokenizer, KL-16: an LDM-style KL
autoencoder with 16 latent channels and stride 16, whose posterior samples MAR scales by 0.2325.
MAR's `python util/download.py` saves it as pretrained_models/vae/kl16.ckpt; this tool turns it
into a folder that every TinyFusion script takes as `--vae-path`:

    python tools/convert_mar_tokenizer.py --ckpt pretrained_models/vae/kl16.ckpt --out pretrained/kl16
    python extract_features.py --vae-path pretrained/kl16 --image-size 256 ...   # 16 x 16 x 16 latents

The checkpoint holds the tokenizer's state dict under "model" (what MAR's loader reads), in LDM's
tensor names. The architecture is read from the tensors' shapes (KL-16: widths 128 128 256 256
512, two residual blocks per level, self-attention in the encoder's last level and in both middle
blocks), every tensor is mapped by name onto diffusers' AutoencoderKL, and the mapping is strict:
a tensor of the checkpoint with no place in the diffusers model, a tensor of the model that nothing
fills, or a shape that differs is one error line naming it. The folder's config says
scaling_factor 0.2325, which tinyfusion/io/vae.py applies when it encodes and decodes.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tinyfusion.errors import TinyFusionError, run_main  # noqa: E402

MAR_LATENT_SCALE = 0.2325  # MAR's engine: posterior.sample() * 0.2325; decoding divides by it
NORM_GROUPS = 32  # LDM's GroupNorm: 32 groups everywhere
KL16_ARCHITECTURE = {"block_out_channels": [128, 128, 256, 256, 512], "layers_per_block": 2,
                     "latent_channels": 16, "attention_levels": [4], "in_channels": 3, "out_channels": 3}
RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                "nin_shortcut": "conv_shortcut"}
ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# the attention projections: 1x1 convolutions in LDM, linear layers in diffusers
ATTENTION_PROJECTION = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


# ------------------------------------------------------------------------- reading
def load_tokenizer_state_dict(path):
    """The tensors under "model" of MAR's tokenizer checkpoint (weights_only=True)."""
    import torch
    if not os.path.isfile(path):
        raise TinyFusionError(f"checkpoint {path} does not exist; MAR's `python util/download.py` saves the tokenizer "
                              f"as pretrained_models/vae/kl16.ckpt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:  # a class or function the weights-only unpickler does not allow, e.g. argparse.Namespace
            raise TinyFusionError(f"refusing to load {path}: it holds a Python object ({unsafe[1]}) other than "
                                  f"tensors, which could run code (loading is weights_only=True)") from None
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        detail = next((line for line in lines if "Unsupported operand" in line), lines[0])[:160]
        raise TinyFusionError(f"could not read {path} ({type(error).__name__}: {detail}); the file is truncated, "
                              f"damaged or not a PyTorch checkpoint") from None
    state_dict = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(value) for value in state_dict.values()):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise TinyFusionError(f"{path} is not MAR's tokenizer checkpoint: it has no state dict under \"model\" "
                              f"(found {found})")
    return dict(state_dict)


def shape_of(state_dict, name):
    if name not in state_dict:
        raise TinyFusionError(f"the checkpoint has no {name}: not MAR's KL tokenizer (LDM encoder/decoder names)")
    return tuple(state_dict[name].shape)


def infer_architecture(state_dict):
    """Widths, blocks per level, latent channels and the encoder levels with self-attention, from
    the tensors' names and shapes."""
    levels = sorted({int(m.group(1)) for m in map(re.compile(r"encoder\.down\.(\d+)\.").match, state_dict) if m})
    if not levels or levels != list(range(len(levels))):
        raise TinyFusionError(f"the checkpoint's encoder levels are {levels}: not MAR's KL tokenizer "
                              f"(expected encoder.down.0, encoder.down.1, ...)")
    blocks = {int(m.group(1)) for m in map(re.compile(r"encoder\.down\.0\.block\.(\d+)\.").match, state_dict) if m}
    return {
        "block_out_channels": [shape_of(state_dict, f"encoder.down.{level}.block.0.conv1.weight")[0]
                               for level in levels],
        "layers_per_block": len(blocks),
        "latent_channels": shape_of(state_dict, "post_quant_conv.weight")[0],
        "attention_levels": [level for level in levels
                             if any(name.startswith(f"encoder.down.{level}.attn.") for name in state_dict)],
        "in_channels": shape_of(state_dict, "encoder.conv_in.weight")[1],
        "out_channels": shape_of(state_dict, "decoder.conv_out.weight")[0],
    }


def diffusers_config(architecture, sample_size=256):
    """AutoencoderKL keyword arguments of an LDM KL tokenizer: attention-bearing encoder levels are
    AttnDownEncoderBlock2D, the decoder has attention in its middle only, latents scaled by 0.2325."""
    levels = len(architecture["block_out_channels"])
    return {
        "in_channels": architecture["in_channels"], "out_channels": architecture["out_channels"],
        "down_block_types": ["AttnDownEncoderBlock2D" if level in architecture["attention_levels"]
                             else "DownEncoderBlock2D" for level in range(levels)],
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(architecture["block_out_channels"]),
        "layers_per_block": architecture["layers_per_block"], "act_fn": "silu",
        "latent_channels": architecture["latent_channels"], "norm_num_groups": NORM_GROUPS,
        "sample_size": sample_size, "scaling_factor": MAR_LATENT_SCALE, "mid_block_add_attention": True,
        "use_quant_conv": True, "use_post_quant_conv": True,
    }


# ------------------------------------------------------------------------- mapping
def module_name(path, num_levels):
    """The diffusers module of an LDM module path (weight/bias stripped), or None."""
    rules = (
        (r"(encoder|decoder)\.mid\.block_([12])\.(\w+)",
         lambda m: _part(f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}", RESNET_PARTS, m[3])),
        (r"(encoder|decoder)\.mid\.attn_1\.(\w+)", lambda m: _part(f"{m[1]}.mid_block.attentions.0", ATTENTION_PARTS, m[2])),
        (r"encoder\.down\.(\d+)\.block\.(\d+)\.(\w+)",
         lambda m: _part(f"encoder.down_blocks.{m[1]}.resnets.{m[2]}", RESNET_PARTS, m[3])),
        (r"encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)",
         lambda m: _part(f"encoder.down_blocks.{m[1]}.attentions.{m[2]}", ATTENTION_PARTS, m[3])),
        (r"encoder\.down\.(\d+)\.downsample\.conv", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv"),
        # LDM stores the decoder's levels shallowest first, diffusers in the order they run (deepest first)
        (r"decoder\.up\.(\d+)\.block\.(\d+)\.(\w+)",
         lambda m: _part(f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}", RESNET_PARTS, m[3])),
        (r"decoder\.up\.(\d+)\.upsample\.conv",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv"),
        (r"(encoder|decoder)\.norm_out", lambda m: f"{m[1]}.conv_norm_out"),
        (r"(encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv", lambda m: m[0]),
    )
    for pattern, rename in rules:
        match = re.fullmatch(pattern, path)
        if match:
            return rename(match)
    return None


def _part(prefix, parts, part):
    return f"{prefix}.{parts[part]}" if part in parts else None


def diffusers_name(name, num_levels):
    """The diffusers AutoencoderKL tensor of an LDM tensor name, or None when it has none."""
    path, _, leaf = name.rpartition(".")
    if leaf not in ("weight", "bias"):
        return None
    module = module_name(path, num_levels)
    return f"{module}.{leaf}" if module else None


def convert_state_dict(state_dict, target_shapes, num_levels):
    """LDM tensors -> diffusers tensors. Strict: every source tensor lands on exactly one target
    of the same shape (attention projections as linear weights) and every target is filled."""
    converted = {}
    for name, tensor in state_dict.items():
        target = diffusers_name(name, num_levels)
        if target not in target_shapes:
            raise TinyFusionError(f"the checkpoint's {name} has no place in the diffusers AutoencoderKL "
                                  f"(no tensor {target or 'of that name'}): not MAR's KL tokenizer layout")
        if target in converted:
            raise TinyFusionError(f"the checkpoint's {name} maps onto {target}, which another tensor already filled")
        if ATTENTION_PROJECTION.search(target) and tensor.dim() == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor.flatten(1)  # a 1x1 convolution is a linear layer over the channels
        if tuple(tensor.shape) != tuple(target_shapes[target]):
            raise TinyFusionError(f"the checkpoint's {name} has shape {tuple(tensor.shape)} but the diffusers "
                                  f"AutoencoderKL's {target} has {tuple(target_shapes[target])}")
        converted[target] = tensor.contiguous()
    unfilled = [target for target in target_shapes if target not in converted]
    if unfilled:
        raise TinyFusionError(f"the diffusers AutoencoderKL's {unfilled[0]} is filled by no tensor of the checkpoint "
                              f"({len(unfilled)} unfilled): not MAR's KL tokenizer layout")
    return converted


def build_diffusers_vae(state_dict, config):
    """The AutoencoderKL of `config` holding the checkpoint's tensors (built on the meta device:
    no random initialisation of weights that are replaced anyway)."""
    import torch
    from diffusers.models import AutoencoderKL
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    target_shapes = {name: tuple(value.shape) for name, value in vae.state_dict().items()}
    converted = convert_state_dict(state_dict, target_shapes, len(config["block_out_channels"]))
    vae.load_state_dict(converted, strict=True, assign=True)
    return vae.eval()


# ------------------------------------------------------------------------- script
def main(args):
    from tinyfusion.io.atomic_files import write_folder_atomically
    from tinyfusion.io.finite import weights_problem
    if os.path.exists(args.out) and not args.overwrite:
        raise TinyFusionError(f"{args.out} already exists; choose another --out or pass --overwrite")
    state_dict = load_tokenizer_state_dict(args.ckpt)
    problem = weights_problem(state_dict)
    if problem:
        raise TinyFusionError(f"{args.ckpt} holds {problem}; download it again")
    architecture = infer_architecture(state_dict)
    config = diffusers_config(architecture)
    vae = build_diffusers_vae(state_dict, config)
    write_folder_atomically(args.out, args.overwrite, vae.save_pretrained)
    stride = 2 ** (len(architecture["block_out_channels"]) - 1)
    what = "MAR's KL-16" if architecture == KL16_ARCHITECTURE else "an LDM KL tokenizer other than MAR's KL-16"
    print(f"wrote {what} (widths {architecture['block_out_channels']}, {architecture['latent_channels']} latent "
          f"channels, stride {stride}, scaling_factor {MAR_LATENT_SCALE}) as a diffusers AutoencoderKL to {args.out}; "
          f"{len(state_dict)} tensors mapped. Use it with --vae-path {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=str, default="pretrained_models/vae/kl16.ckpt",
                        help="MAR's tokenizer checkpoint (default: where MAR's util/download.py saves it)")
    parser.add_argument("--out", type=str, default="pretrained/kl16",
                        help="diffusers AutoencoderKL folder to write (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

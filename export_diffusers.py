"""Export a plain or pruned DiT checkpoint to diffusers.

Writes `DIR/transformer` (a `DiTTransformer2DModel` whose number of layers is the checkpoint's
depth) and, given a local AutoencoderKL folder (`--vae-path`), a whole `DiTPipeline` folder
(`model_index.json`, transformer, vae, DDIM scheduler with DiT's linear betas, id2label) that
`DiTPipeline.from_pretrained(DIR)` loads:

    python export_diffusers.py --model DiT-D14/2 --ckpt pruned.pt --out exported --vae-path pretrained/sd-vae-ft-ema

The weight mapping is the one of diffusers' own DiT conversion: qkv split into to_q/to_k/to_v,
the timestep and label embedders copied into every block's `norm1.emb`, each block's adaLN
Linear to `norm1.linear` (same shift/scale/gate chunk order), the final adaLN Linear and output
Linear to `proj_out_1` / `proj_out_2`.

Two diffusers quirks the export has to live with (diffusers hard-codes both):
- DiT's timestep features use frequencies exp(-ln(10000) k / 128); diffusers' DiT
  embedding uses k / 127 (`downscale_freq_shift=1`), also for the hub's facebook/DiT-XL-2-256.
  So a stock load differs slightly from our model; `match_original_timestep_embedding(
  pipe.transformer)` (a one-line attribute change, not stored in any config) makes it
  reproduce our model's predictions exactly.
- `DiTPipeline` uses label 1000 as the null (unconditional) class for guidance. A model with
  fewer classes is exported with its label table padded to 1000 classes: our null row goes to
  row 1000 and to the unused rows in between, so guidance works and real classes are unchanged.
  A stock DiTPipeline does not check labels, so a label between the model's classes and 1000
  would silently sample unconditionally: `load_pipeline(DIR)` refuses such labels.
- diffusers stores id2label in model_index.json, whose keys JSON makes strings; DiTPipeline
  declares integer keys, so a stock load logs a type warning. `load_pipeline(DIR)` passes them
  as integers (no warning), and applies the exact timestep frequencies.

A gated model (--model DiT-XL-1-2, ...) is exported as the blocks its gates keep, and only if
the gates were trained: untrained gates tie and would pick arbitrary blocks. The kept blocks are
recorded in `DIR/tinyfusion_export.json`. A checkpoint of a prune_by_learning.py run holds only
what the search trained (gate logits, LoRA factors): its decision (the EMA gate logits, or the raw
ones with --no-ema) is applied to the run's source weights (its --load-weight, which must be
readable from here), exactly as the run's --save-model output applies its final decision; the
LoRA update only guided the search and is not exported.

Sampling differences to our sample.py: DiTPipeline samples with DDIM (eta 0, timesteps
range(0, 1000, 1000 // steps)), guides all latent channels and discards the learned variance;
sample.py follows DiT (DDPM with the learned variance, guidance on the first 3 channels).
`sample.py --sampler ddim --timestep-spacing leading --guide-all-channels` is the sampler of the
pipeline (same images to float rounding from the same initial noise).
"""
import argparse
import functools
import json
import os

from tinyfusion.flags import add_checkpoint_args, add_model_args
from tinyfusion.errors import TinyFusionError, run_main
from tinyfusion.io.atomic_files import write_folder_atomically

# torch, diffusers and the model code are imported inside the functions that use them, so that
# `--help` and a bad flag answer without loading them

DIFFUSERS_NULL_CLASS = 1000  # the label DiTPipeline feeds as "unconditional" (hard-coded there)
POS_EMBED_TOLERANCE = 1e-4   # diffusers recomputes the fixed sin-cos table; ours must be that table


def label_table_for_diffusers(model):
    """Our label table laid out for diffusers: (num_embeds_ada_norm, table). diffusers' label
    embedding always has a null row at index num_embeds_ada_norm; DiTPipeline asks for index 1000."""
    import torch
    table = model.y_embedder.embedding_table.weight.detach().float()
    num_classes = model.num_classes
    if table.shape[0] == num_classes:  # trained without label dropout: no null row to guide with
        null_row = torch.zeros_like(table[:1])
    else:
        null_row = table[num_classes:num_classes + 1]
    if num_classes >= DIFFUSERS_NULL_CLASS:
        return num_classes, torch.cat([table[:num_classes], null_row])
    padding = null_row.expand(DIFFUSERS_NULL_CLASS + 1 - num_classes, -1)
    return DIFFUSERS_NULL_CLASS, torch.cat([table[:num_classes], padding])


def diffusers_config(model, num_embeds_ada_norm):
    """DiTTransformer2DModel constructor arguments describing `model`."""
    return dict(num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
                in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth,
                dropout=0.0, attention_bias=True, sample_size=model.input_size, patch_size=model.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=num_embeds_ada_norm,
                upcast_attention=False, norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=1e-6)


def convert_state_dict(model, label_table):
    """Our DiT's weights under DiTTransformer2DModel's parameter names."""
    ours = {key: value.detach().float() for key, value in model.state_dict().items()}
    embedders = {
        "norm1.emb.timestep_embedder.linear_1.weight": ours["t_embedder.mlp.0.weight"],
        "norm1.emb.timestep_embedder.linear_1.bias": ours["t_embedder.mlp.0.bias"],
        "norm1.emb.timestep_embedder.linear_2.weight": ours["t_embedder.mlp.2.weight"],
        "norm1.emb.timestep_embedder.linear_2.bias": ours["t_embedder.mlp.2.bias"],
        "norm1.emb.class_embedder.embedding_table.weight": label_table,
    }
    converted = {
        "pos_embed.proj.weight": ours["x_embedder.proj.weight"],
        "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
        "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],  # chunk(2) = shift, scale in both
        "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": ours["final_layer.linear.weight"],
        "proj_out_2.bias": ours["final_layer.linear.bias"],
    }
    for index in range(model.depth):
        block, target = f"blocks.{index}.", f"transformer_blocks.{index}."
        # diffusers recomputes the conditioning in every block, so every block holds the embedders
        converted.update({target + name: tensor.clone() for name, tensor in embedders.items()})
        # qkv rows are laid out (3, heads, head_dim): the first third is q, then k, then v
        for part in ("weight", "bias"):
            q, k, v = ours[f"{block}attn.qkv.{part}"].chunk(3, dim=0)
            converted.update({f"{target}attn1.to_q.{part}": q.clone(), f"{target}attn1.to_k.{part}": k.clone(),
                              f"{target}attn1.to_v.{part}": v.clone()})
            converted[f"{target}attn1.to_out.0.{part}"] = ours[f"{block}attn.proj.{part}"]
            converted[f"{target}norm1.linear.{part}"] = ours[f"{block}adaLN_modulation.1.{part}"]
            converted[f"{target}ff.net.0.proj.{part}"] = ours[f"{block}mlp.fc1.{part}"]
            converted[f"{target}ff.net.2.{part}"] = ours[f"{block}mlp.fc2.{part}"]
    return converted


def check_exportable(model):
    """One-line errors for what DiTTransformer2DModel cannot represent."""
    import torch
    from models import get_2d_sincos_pos_embed
    if model.mlp_ratio != 4.0:
        raise TinyFusionError(f"the model has mlp_ratio {model.mlp_ratio}; DiTTransformer2DModel only has "
                              f"MLP ratio 4, so it cannot be exported")
    grid = model.input_size // model.patch_size
    standard = torch.from_numpy(get_2d_sincos_pos_embed(model.hidden_size, grid)).float()
    deviation = (model.pos_embed.detach().float()[0] - standard).abs().max().item()
    if deviation > POS_EMBED_TOLERANCE:
        raise TinyFusionError(f"the checkpoint's pos_embed differs from the fixed 2-D sin-cos table by "
                              f"{deviation:.3g}; diffusers recomputes that table, so this model cannot be exported")


def check_gates_trained(model):
    """A gated model's decision is the argmax of each group's logits: refuse when a group's
    top logits tie (freshly initialised gates all hold 0.02), as its blocks would be arbitrary."""
    for index, logits in enumerate(model.gate_logits):
        logits = logits.detach()
        if int((logits == logits.max()).sum()) > 1:
            raise TinyFusionError(
                f"the gates of group {index} ({model.groups[index][0]} of {model.groups[index][1]} blocks) were never "
                f"trained: its {int((logits == logits.max()).sum())} best candidates tie, so the kept blocks would be "
                f"arbitrary; export the pruned model prune_by_learning.py saved (--save-model) with the plain "
                f"--model, or a checkpoint of a pruning run")


def pruning_run_args(obj):
    """The flags of a prune_by_learning.py run that wrote the training checkpoint `obj`, or None."""
    run_args = obj.get("args") if isinstance(obj, dict) else None
    run_args = vars(run_args) if isinstance(run_args, argparse.Namespace) else run_args
    if isinstance(run_args, dict) and "tau_range" in run_args and "kept_indices" in obj:
        return run_args
    return None


def gated_model_of_run(args, ckpt, obj, run_args):
    """(gated model on the run's source weights with the run's gate logits, source metadata)."""
    from tinyfusion.io.downloads import is_released_name
    from tinyfusion.pruning.pruned_models import load_source_model, plain_name
    from tinyfusion.io.run_folder import run_folder_name
    import torch
    source = run_args["load_weight"]
    if args.model != run_args["model"]:
        raise TinyFusionError(f"{ckpt} is a checkpoint of a prune_by_learning.py run of --model {run_args['model']}; "
                              f"pass --model {run_args['model']}")
    if not os.path.isfile(source) and not is_released_name(source):
        pruned = run_args.get("save_model") or os.path.join(
            run_folder_name(run_args["results_dir"], run_args["prefix"], run_args["model"]), "pruned.pt")
        raise TinyFusionError(f"{ckpt} is a checkpoint of a prune_by_learning.py run: it holds the gates (and LoRA "
                              f"factors) but not the model, whose weights come from the run's --load-weight {source}, "
                              f"which does not exist here; run this from the folder the pruning ran in, or export the "
                              f"pruned model the run saved (--save-model, here {pruned}) with --model "
                              f"{plain_name(run_args['model'])}")
    model, metadata = load_source_model(args.model, source, args.image_size, args.num_classes, args.vae, args.vae_path,
                                        groups=run_args.get("groups") or args.groups)
    logits = obj["model" if args.no_ema else "ema"]
    with torch.no_grad():
        for index, gate in enumerate(model.gate_logits):
            gate.copy_(logits[f"gate_logits.{index}"])
    return model, metadata


def to_diffusers_transformer(model):
    """A DiTTransformer2DModel (fp32, eval) holding `model`'s weights; gated models are first
    pruned to the blocks their (trained) gates keep."""
    from models import prune_to_kept_blocks
    from diffusers import DiTTransformer2DModel
    if getattr(model, "groups", None) is not None:
        check_gates_trained(model)
        model = prune_to_kept_blocks(model, model.kept_indices())
    check_exportable(model)
    num_embeds, label_table = label_table_for_diffusers(model)
    transformer = DiTTransformer2DModel(**diffusers_config(model, num_embeds))
    transformer.load_state_dict(convert_state_dict(model, label_table), strict=True)
    return transformer.eval()


def match_original_timestep_embedding(transformer):
    """Make a loaded DiTTransformer2DModel use DiT's timestep frequencies exp(-ln(10000) k / 128)
    instead of diffusers' k / 127, so it reproduces the original model (and ours) exactly.
    An attribute of the modules, not of the config: call it after every from_pretrained."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


@functools.cache
def checked_pipeline_class():
    """DiTPipeline whose __call__ refuses class labels outside the model's own classes."""
    import torch
    from diffusers import DiTPipeline

    class TinyFusionDiTPipeline(DiTPipeline):
        num_classes = None  # set by load_pipeline from tinyfusion_export.json

        def __call__(self, class_labels, *args, **kwargs):
            labels = torch.as_tensor(class_labels).reshape(-1).tolist()
            limit = self.num_classes or DIFFUSERS_NULL_CLASS
            outside = [label for label in labels if not 0 <= int(label) < limit]
            if outside:
                raise ValueError(f"class labels {outside} are outside this model's {limit} classes (0..{limit - 1}); "
                                 f"its label table is padded to diffusers' 1000 classes with the null class, so they "
                                 f"would sample unconditionally")
            return super().__call__(class_labels, *args, **kwargs)

    return TinyFusionDiTPipeline


def load_pipeline(folder, exact_timesteps=True, **kwargs):
    """A DiTPipeline of an exported folder that refuses labels outside the model's classes,
    reads id2label without diffusers' type warning and, with exact_timesteps, uses DiT's
    timestep frequencies (match_original_timestep_embedding). kwargs go to from_pretrained."""
    with open(os.path.join(folder, "model_index.json")) as f:
        id2label = json.load(f).get("id2label") or {}
    export_info = os.path.join(folder, "tinyfusion_export.json")
    num_classes = None
    if os.path.isfile(export_info):
        with open(export_info) as f:
            num_classes = json.load(f).get("num_classes")
    kwargs.setdefault("id2label", {int(key): value for key, value in id2label.items()})
    pipe = checked_pipeline_class().from_pretrained(folder, **kwargs)
    pipe.num_classes = num_classes
    if exact_timesteps:
        match_original_timestep_embedding(pipe.transformer)
    return pipe


def build_pipeline(transformer, vae, id2label):
    from diffusers import DDIMScheduler, DiTPipeline
    # the scheduler of diffusers' DiT conversion: DiT's 1000 linear betas, eps prediction, no clipping
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              prediction_type="epsilon", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)


def read_id2label(path, num_classes):
    """{"0": "name, other name", ...} from a JSON file, or class indices as names."""
    if path is None:
        return {str(index): str(index) for index in range(num_classes)}
    with open(path) as f:
        id2label = {str(key): str(value) for key, value in json.load(f).items()}
    outside = [key for key in id2label if not key.isdigit() or int(key) >= num_classes]
    if outside:
        raise TinyFusionError(f"--id2label {path} names classes {outside[:3]} outside 0..{num_classes - 1}; "
                              f"give a JSON object mapping class indices to names")
    return id2label


def main(args):
    from tinyfusion.io.vae import is_pixel_space, latent_scale, load_vae
    from tinyfusion.families.build import build_model
    from tinyfusion.io.downloads import resolve_released
    from tinyfusion.families import family_for_model
    family = family_for_model(args.model)
    if not family.exports_to_diffusers:
        raise TinyFusionError(f"--model {args.model} is a {family.entry.name}; this script supports DiT models only "
                              f"(diffusers' DiTPipeline samples a DiT)")
    if os.path.exists(args.out) and not args.overwrite:
        raise TinyFusionError(f"{args.out} already exists; choose another --out or pass --overwrite")
    from tinyfusion.io.checkpoints import load_checkpoint_file
    ckpt = resolve_released(args.ckpt)  # a released name is found in pretrained/ or downloaded
    checkpoint = load_checkpoint_file(ckpt)
    run_args = pruning_run_args(checkpoint)
    if run_args is not None:  # gates + LoRA only: the decision goes onto the run's source weights
        model, metadata = gated_model_of_run(args, ckpt, checkpoint, run_args)
    else:
        del checkpoint  # build_model reads it again: do not hold two copies of a large model
        model, metadata = build_model(args.model, args.image_size, args.num_classes, args.vae, args.vae_path,
                                      ckpt=ckpt, use_ema=not args.no_ema, groups=args.groups)
    transformer = to_diffusers_transformer(model.eval())
    if getattr(model, "groups", None) is not None:  # the blocks the trained gates keep, in the gated model's frame
        kept_blocks, source_depth = model.kept_indices(), model.depth
    elif metadata and metadata.get("kept_indices") is not None:  # a pruned checkpoint: the blocks of its source
        kept_blocks, source_depth = list(metadata["kept_indices"]), metadata.get("source_depth")
    else:
        kept_blocks, source_depth = list(range(model.depth)), model.depth
    vae_folder = args.vae_path or (args.vae if os.path.isdir(args.vae) else None)
    vae = load_vae(args.vae, vae_folder) if vae_folder else None
    if vae is not None:
        if vae.config.latent_channels != model.in_channels:
            raise TinyFusionError(f"the VAE in {vae_folder} has {vae.config.latent_channels} latent channels but "
                                  f"the model takes {model.in_channels}; pass the VAE the model was trained with")
        # the pipeline reads the scale from the config: the one our latents use (the folder's, 0.18215
        # when it names none)
        vae.register_to_config(scaling_factor=latent_scale(vae))
    id2label = read_id2label(args.id2label, model.num_classes)
    source = os.path.abspath(run_args["load_weight"] if run_args else ckpt)
    provenance = dict(source_checkpoint=source, pruning_run_checkpoint=os.path.abspath(ckpt) if run_args else None,
                      model=args.model, depth=transformer.config.num_layers,
                      kept_blocks=kept_blocks, source_depth=source_depth,
                      num_classes=model.num_classes, pruning_metadata=metadata,
                      null_class_in_diffusers=transformer.config.num_embeds_ada_norm,
                      timestep_embedding="call export_diffusers.match_original_timestep_embedding(transformer) after "
                                         "loading to use DiT's exact timestep frequencies (load_pipeline does)")

    def write(folder):
        if vae is None:
            transformer.save_pretrained(os.path.join(folder, "transformer"))
        else:
            build_pipeline(transformer, vae, id2label).save_pretrained(folder)
            # DiTPipeline takes id2label but does not record it; from_pretrained reads it back from here
            index_file = os.path.join(folder, "model_index.json")
            with open(index_file) as f:
                index = json.load(f)
            index["id2label"] = id2label
            with open(index_file, "w") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(folder, "tinyfusion_export.json"), "w") as f:
            json.dump(provenance, f, indent=2, default=str)

    write_folder_atomically(args.out, args.overwrite, write)
    depth = transformer.config.num_layers
    if vae is not None:
        print(f"wrote a DiTPipeline ({depth} layers, blocks {kept_blocks} of {source_depth}) to {args.out}: "
              f"export_diffusers.load_pipeline({args.out!r}) (or DiTPipeline.from_pretrained)")
        if model.num_classes < DIFFUSERS_NULL_CLASS:
            print(f"note: labels {model.num_classes}..{DIFFUSERS_NULL_CLASS - 1} are not classes of this model; a stock "
                  f"DiTPipeline samples them unconditionally, load_pipeline refuses them")
    else:
        reason = ("pixel-space models (--vae none) have no VAE" if is_pixel_space(args.vae) and not vae_folder
                  else "no local VAE folder was given (--vae-path)")
        print(f"wrote only the transformer ({depth} layers) to {args.out}/transformer, no DiTPipeline because {reason}: "
              f"DiTTransformer2DModel.from_pretrained({args.out!r}, subfolder='transformer')")
    if model.num_classes > DIFFUSERS_NULL_CLASS:
        print(f"note: DiTPipeline uses label {DIFFUSERS_NULL_CLASS} as the null class, a real class of this model: "
              f"sample with guidance_scale=1")
    print("for predictions identical to ours, after loading call "
          "export_diffusers.match_original_timestep_embedding(transformer) (pipe.transformer for a pipeline)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, default_model="DiT-XL/2")
    add_checkpoint_args(parser, help="plain, training or pruned DiT checkpoint", required=True)
    parser.add_argument("--out", type=str, required=True, help="output folder (must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--id2label", type=str, default=None,
                        help="JSON file {\"0\": \"tench, Tinca tinca\", ...}; default: class indices as names")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())

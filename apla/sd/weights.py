"""Loading pretrained Stable Diffusion (v1.x and 2.x) without diffusers.

APLA "builds upon pre-trained stable diffusion networks" (APLA, Abstract; "Implementation Details":
"utilize the pre-trained weights of the Stable Diffusion"). This module reads those weights in the two
layouts they are published in and accounts for every tensor. No APLA equation lives here.

Sources `load_stable_diffusion` takes:
- a single `.safetensors` file (v1-5-pruned-emaonly.safetensors, the "ldm" layout: U-Net under
  `model.diffusion_model.`, VAE under `first_stage_model.`, CLIP under `cond_stage_model.transformer.`);
  carries no config, so SD v1.5's defaults are used; an SD 2.x file (v2-1_768-ema-pruned.safetensors,
  v2-1_512-ema-pruned.safetensors) is told by its OpenCLIP text tower under `cond_stage_model.model.`, and what
  it cannot tell is assumed (`single_file_config`, `SD2_VARIANTS`) and said (`assumption_note`);
- a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), names by identity;
- a folder that Tune-A-Video's `pipeline.save_pretrained` wrote (its tuned outputs/<run>: the same layout, its
  unet/config.json of `UNet3DConditionModel` with "...3D" blocks, its weights a pickle holding the temporal
  layers): the U-Net as it was tuned, temporal weights included, nothing inflated afresh;
- a hub id ("org/name"), resolved to such a folder through huggingface_hub's cache;
- `.ckpt` / `.bin` pickles, only through `torch.load(weights_only=True)`.

The weights are held once: every network is built on the meta device (no memory, no initialisation) and
filled from the file one tensor at a time, each read, converted to the requested dtype and device, and made
the model's parameter before the next is read; the temporal parameters, which no SD file has, are then
allocated and initialised alone. Safetensors are read with plain file reads, not memory-mapped, so the
file's pages do not add to the process's resident memory. A missing key, an unknown key or a wrong shape is
an error that names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

from apla.assets import model_path
from apla.checkpoint import WeightsError
from apla.scheduler import PREDICTION_TYPES, make_alpha_bar
from apla.sd.text import EOS, PAD_SD2, build_text_encoder, load_tokenizer
from apla.sd.attention import TransformerBlock
from apla.sd.unet import UNet3DConditionModel, UNetConfig, is_temporal_param, is_tune_a_video
from apla.sd.variants import SD2_TEXT_PREFIX, SD2_VARIANTS, is_sd2, sd2_variant
from apla.sd.vae import VAE_LDM_PREFIX, AutoencoderKL, VAEConfig, vae_key_from_ldm

COMPONENTS = ("vae", "text_encoder", "unet")

# Single-file prefixes of the three networks, per generation (SD 2.x: OpenCLIP's text tower, not CLIP's)
LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": VAE_LDM_PREFIX, "text_encoder": "cond_stage_model.transformer."}
SD2_PREFIX = {**LDM_PREFIX, "text_encoder": SD2_TEXT_PREFIX}
# Entries real single files carry besides the networks' weights: noise-schedule buffers, EMA bookkeeping
# (and EMA copies), the text encoder's int64 position_ids. They are skipped.
LDM_SKIPPED = re.compile(
    r"^(betas|alphas_cumprod(_prev)?|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
    r"|log_one_minus_alphas_cumprod|sqrt_recip(m1)?_alphas_cumprod|posterior_variance"
    r"|posterior_log_variance_clipped|posterior_mean_coef[12]|model_ema\..*)$"
    r"|embeddings\.position_ids$"
)
# Keys of a later Stable Diffusion generation this module does not build: SDXL (two text embedders).
OTHER_GENERATIONS = {"conditioner.embedders.": "SDXL"}

# SD 2.x's U-Net as its published diffusers configs give it (stabilityai/stable-diffusion-2-1 and -2-1-base,
# unet/config.json; Stability's v2-inference*.yaml: num_head_channels 64, use_linear_in_transformer, context_dim
# 1024); the rest is SD v1.5's. What a single file cannot tell, its variant, is in SD2_VARIANTS.
SD2_UNET = dict(attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, cross_attention_dim=1024)
# The two SD 2.x variants a single file can be: 768 px v-prediction (v2-1_768-ema-pruned, 768-v-ema; Stability's
# v2-inference-v.yaml, `parameterization: "v"`) and 512 px ε (v2-1_512-ema-pruned, 512-base-ema; v2-inference.yaml).

# Files of a diffusers folder, per component: (weights, in order of preference), config.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
FOLDER_FILES = {
    "vae": (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), "config.json"),
    "text_encoder": (("model.safetensors", "pytorch_model.bin"), "config.json"),
    "unet": (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"), "config.json"),
}


def count_parameters(module: nn.Module, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Number of scalars in `module`'s parameters, leaving out those whose name `skip` accepts. Every VGT
    parameter trains, so for VGT this is the count of Table 1 ("Trainable Parameters")."""
    return sum(p.numel() for name, p in module.named_parameters() if not skip(name))


@dataclass
class StableDiffusion:
    vae: AutoencoderKL | None
    text_encoder: nn.Module | None
    tokenizer: object
    alpha_bar: torch.Tensor  # (1000,) float64, the training schedule's \bar\alpha_t
    unet: nn.Module | None = None
    source: str = ""
    # what the U-Net predicts, one of apla.scheduler.PREDICTION_TYPES: "epsilon", or "v_prediction", which
    # apla.algorithm.APLA turns into eps (apla.scheduler.eps_from_v); see load_stable_diffusion
    prediction_type: str = "epsilon"
    # what the source did not say and the loader assumed (an SD 2.x single file: single_file_config), else empty
    assumed: dict = field(default_factory=dict)


class TensorFile:
    """The tensors of one checkpoint file, fetched lazily by name: `keys()`, `shape(k)`, `get(k)`.

    Safetensors: safe_open checks the file and gives names and shapes; `get` reads one tensor's bytes into
    fresh memory (the header's offsets), so nothing of the file stays mapped. Pickles (.ckpt/.bin) go
    through torch.load(weights_only=True, mmap=True).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"{self.path}: no such file")
        if self.path.suffix == ".safetensors":
            try:
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = list(self._file.keys())
            except Exception as e:  # truncated, empty or not a safetensors file
                raise WeightsError(f"{self.path}: not a readable .safetensors file ({e})") from None
            self._dict = None
            with open(self.path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._header = json.loads(f.read(size))
            self._data_start = 8 + size
            self._scratch = torch.empty(0, dtype=torch.uint8)
        elif self.path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise WeightsError(f"{self.path}: not a loadable weights-only pickle ({e})") from None
            obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
            if not isinstance(obj, dict):
                raise WeightsError(f"{self.path}: holds a {type(obj).__name__}, not a dict of tensors")
            self._dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            self._keys = list(self._dict)
        else:
            raise WeightsError(f"{self.path}: unsupported file type {self.path.suffix!r} (.safetensors, .ckpt, .bin)")

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._dict is not None:
            return tuple(self._dict[key].shape)
        return tuple(self._file.get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key`, converted to `dtype` (a floating one) when given. A safetensors tensor that is
        converted is read into one reused buffer first, so only the converted copy is newly allocated."""
        if self._dict is not None:
            t = self._dict[key]
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        entry = self._header[key]
        stored = SAFETENSORS_DTYPES.get(entry["dtype"])
        if stored is None:
            raise WeightsError(f"{self.path}: {key!r} has dtype {entry['dtype']}, which is not supported")
        start, end = entry["data_offsets"]
        convert = dtype is not None and stored.is_floating_point and stored != dtype
        if not convert:
            buf = torch.empty(end - start, dtype=torch.uint8)
        else:
            if self._scratch.numel() < end - start:
                self._scratch = torch.empty(end - start, dtype=torch.uint8)
            buf = self._scratch[: end - start]
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(buf.numpy()) != end - start:
                raise WeightsError(f"{self.path}: truncated data for {key!r}")
        t = buf.view(stored).reshape(entry["shape"])
        return t.to(dtype) if convert else t


def _fits(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Equal shapes, or a (C, C, 1, 1) 1x1-conv weight stored for a (C, C) Linear (the VAE's attention)."""
    return shape == target or (len(shape) == 4 and shape[2:] == (1, 1) and shape[:2] == target)


def load_into(
    model: nn.Module,
    file: TensorFile,
    names: dict[str, str | tuple[str, ...]],
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    keep_fresh: Callable[[str], bool] = lambda name: False,
    init_fresh: Callable[[nn.Module, object], None] | None = None,
) -> nn.Module:
    """Load `file` into `model` with every tensor accounted for.

    `names` maps the file's keys to the model's state_dict names; a tuple of k names takes the tensor split in k
    equal parts along its first dimension (OpenCLIP's fused q/k/v projections). Every model name must receive
    exactly one tensor of its shape (a 1x1 conv weight may fill a Linear) unless `keep_fresh(name)` is true; every
    mapped key must be a model name. Checked on shapes alone before any data is read. Tensors replace the
    model's parameters one at a time (a model built on the meta device is filled without a second copy);
    `init_fresh(model, device)` then creates what the file does not hold.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    kind = type(model).__name__
    parts = {key: ours if isinstance(ours, tuple) else (ours,) for key, ours in names.items()}
    for key, ours in parts.items():
        for name in ours:
            if name not in expected:
                raise WeightsError(f"{file.path}: unknown key {key!r} (-> {name!r}, which {kind} does not have)")
        shape, target = file.shape(key), expected[ours[0]]
        if len(ours) > 1:  # k parts of one shape, stacked along the first dimension
            target = (len(ours) * target[0], *target[1:]) if all(expected[n] == target for n in ours) else None
        if target is None or not _fits(shape, target):
            needs = " + ".join(str(list(expected[n])) for n in ours)
            raise WeightsError(f"{file.path}: wrong shape for {key!r}: {list(shape)} in the file, {kind} needs {needs}")
    flat = [name for ours in parts.values() for name in ours]
    targets = set(flat)
    if len(targets) != len(flat):
        dup = next(t for t in targets if flat.count(t) > 1)
        raise WeightsError(f"{file.path}: several keys map to {dup!r}")
    missing = [k for k in expected if k not in targets and not keep_fresh(k)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WeightsError(f"{file.path}: missing key {missing[0]!r}{more} for {kind}")

    for key, ours in parts.items():  # one tensor at a time: read, converted, in place, before the next is read
        t = file.get(key, dtype)
        for name, part in zip(ours, t.chunk(len(ours)) if len(ours) > 1 else (t,)):
            # reshape: a no-op but for 1x1-conv weights filling a Linear; a split part gets its own storage
            part = part.reshape(expected[name])
            _assign(model, name, (part.clone() if len(ours) > 1 else part).to(device))
        del t
    if init_fresh is not None:
        init_fresh(model, device)
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise WeightsError(f"{file.path}: nothing loaded into {empty[0]!r} of {kind}")
    return model.to(device=device, dtype=dtype)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Make `tensor` the parameter or buffer `name` of `model` (replacing a meta or allocated one)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
    else:
        module._buffers[leaf] = tensor


def _init_temporal(unet: nn.Module, device) -> None:
    """The temporal layers of a U-Net built on the meta device, allocated and initialised alone."""
    for block in unet.modules():
        if isinstance(block, TransformerBlock):
            block.init_temporal(device)


def _fill_position_ids(text_encoder: nn.Module, device) -> None:
    """CLIP's position_ids: a computed buffer (0..76), in no file, that a meta-built text encoder lacks."""
    for name, buf in text_encoder.named_buffers():
        if buf.is_meta and name.endswith("position_ids"):
            _assign(text_encoder, name, torch.arange(buf.shape[-1], device=device).expand(buf.shape))


def _empty_vae(cfg: VAEConfig) -> AutoencoderKL:
    with torch.device("meta"):  # every parameter comes from the file: nothing to allocate or initialise
        return AutoencoderKL(cfg)


def _empty_text_encoder(cfg: dict | None = None) -> nn.Module:
    try:  # transformers >= 5 (imported when first needed: transformers takes seconds to import)
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), torch.device("meta"):  # position_ids are filled in by _fill_position_ids
        return build_text_encoder(cfg)


def _empty_unet(cfg: UNetConfig) -> UNet3DConditionModel:
    with torch.device("meta"):  # the temporal layers are made by _init_temporal
        return UNet3DConditionModel(cfg)


def _strip_text_model(key: str) -> str:
    # transformers >= 5 names CLIPTextModel's parameters without `text_model.`; SD files (and older
    # single files, which lack it) are mapped onto that flat form.
    return key[len("text_model."):] if key.startswith("text_model.") else key


def _text_names(model: nn.Module, keys: Iterable[str], prefix: str = "") -> dict[str, str]:
    """File key -> model name for CLIP, whichever of the two naming forms each side uses."""
    ours = {_strip_text_model(k): k for k in model.state_dict()}
    return {
        k: ours.get(_strip_text_model(k[len(prefix):]), _strip_text_model(k[len(prefix):]))
        for k in keys
        if k.startswith(prefix) and not LDM_SKIPPED.search(k)
    }


def _generation(file: TensorFile) -> dict[str, str]:
    """The single-file prefixes of the generation `file` belongs to (LDM_PREFIX: SD v1.x, SD2_PREFIX: SD 2.x, told by
    OpenCLIP's text tower); anything else, or a key outside its three networks, is refused in one line."""
    keys = file.keys()
    for prefix, generation in OTHER_GENERATIONS.items():
        if any(k.startswith(prefix) for k in keys):
            raise WeightsError(f"{file.path}: not a Stable Diffusion 1.x or 2.x checkpoint (has {generation} keys "
                               f"'{prefix}...')")
    prefixes = SD2_PREFIX if is_sd2(keys) else LDM_PREFIX
    if not any(k.startswith(p) for k in keys for p in prefixes.values()):
        raise WeightsError(f"{file.path}: not a Stable Diffusion 1.x or 2.x checkpoint (no keys under "
                           f"{', '.join(prefixes.values())})")
    for k in keys:
        if not LDM_SKIPPED.search(k) and not any(k.startswith(p) for p in prefixes.values()):
            raise WeightsError(f"{file.path}: unknown key {k!r} (outside the U-Net, VAE and text encoder)")
    return prefixes


def single_file_config(path: str | Path) -> tuple[UNetConfig, dict]:
    """What a single file is, from its names alone: its U-Net's config, and what was assumed where the file is silent
    (empty for SD v1.x, whose defaults are SD v1.5's).

    An SD 2.x file holds no config: nothing in it says v-prediction, upcast attention or the sample size. The
    variant (SD2_VARIANTS) is read from the file's name, as published: "768" -> 768-v; else "512" or "base" ->
    512-base; a name with neither -> 768-v, SD 2.x's flagship kind (2.0 and 2.1 at 768) and what diffusers assumes
    for an SD 2 file too. Attention is upcast in both, as Stability's own code does for every SD 2 model
    (apla.sd.attention.attention). `assumption_note` says all of it in one line."""
    file = path if isinstance(path, TensorFile) else TensorFile(path)
    if _generation(file) is LDM_PREFIX:
        return UNetConfig(), {}
    variant, named = sd2_variant(file.path)
    assumed = {"variant": variant, "from": "its name" if named else "no word in its name", **SD2_VARIANTS[variant],
               "upcast_attention": True}
    cfg = UNetConfig(**SD2_UNET, upcast_attention=True, sample_size=assumed["sample_size"])
    return cfg, assumed


def assumption_note(sd: StableDiffusion) -> str | None:
    """The one line that says what loading `sd` assumed (None when its source said everything); a prediction type
    that was given, not assumed, is said as given."""
    a = sd.assumed
    if not a:
        return None
    side = a["sample_size"]
    kind = a["prediction_type"] if "prediction_type" in a else f"{sd.prediction_type} (as given)"
    return (f"{sd.source}: a single SD 2.x file does not say its variant; assumed {a['variant']} ({a['from']}): "
            f"{kind}, {side}x{side} latents ({8 * side} px), attention upcast to float32")


def _mapped(rule: Callable[[str], str], key: str, file: TensorFile) -> str:
    try:
        return rule(key)
    except ValueError:  # a name rule that knows no such key
        raise WeightsError(f"{file.path}: unknown key {key!r}") from None


# The U-Net's single-file names. Inside a ResNet block: single-file (ldm) name -> diffusers name
_LDM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}


def unet_key_from_ldm(key: str, layers_per_block: int = 2) -> str:
    """Map a single-file name (`model.diffusion_model.input_blocks.N.M...`) to our (= diffusers') name.

    Single files number the U-Net's layers flatly: input_blocks.0 is conv_in, then per level `layers_per_block`
    pairs (ResNet .0, transformer .1) and one downsampler (.0.op); middle_block.{0,1,2} = ResNet, transformer,
    ResNet; output_blocks per level `layers_per_block + 1` entries (ResNet .0, transformer .1, upsampler .1 or .2).
    Transformer internals and up/down sampler convs keep their names."""
    if not key.startswith(LDM_PREFIX["unet"]):
        raise ValueError(f"not a single-file U-Net key: {key}")
    k = key[len(LDM_PREFIX["unet"]):]
    for old, new in _LDM_TOP.items():
        if k.startswith(old + "."):
            return new + k[len(old):]
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)", k)
    if m is None:
        raise ValueError(f"not a single-file U-Net key: {key}")
    part, n, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    sub = int(sub) if sub is not None else None
    per = layers_per_block + 1
    if part == "middle_block":
        level, layer, kind = "mid_block", n // 2, ("resnets" if n % 2 == 0 else "attentions")
    elif part == "input_blocks":
        level, layer = f"down_blocks.{(n - 1) // per}", (n - 1) % per
        kind = "downsamplers" if rest.startswith("op.") else ("resnets" if sub == 0 else "attentions")
        if kind == "downsamplers":
            layer, rest = 0, "conv." + rest[len("op."):]
    else:
        level, layer = f"up_blocks.{n // per}", n % per
        kind = "upsamplers" if rest.startswith("conv.") else ("resnets" if sub == 0 else "attentions")
        layer = 0 if kind == "upsamplers" else layer
    if kind == "resnets":
        for old, new in _LDM_RESNET.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        else:
            raise ValueError(f"not a single-file U-Net key: {key}")
    return f"{level}.{kind}.{layer}.{rest}"


# OpenCLIP's text tower (SD 2.x single files, under `cond_stage_model.model.`) -> transformers' CLIPTextModel names
_OPEN_CLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
_OPEN_CLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# in the file, unused by SD 2: CLIP's image-text projection and temperature (the text states are taken before them)
OPEN_CLIP_UNUSED = ("text_projection", "logit_scale")
OPEN_CLIP_HEAD_WIDTH = 64  # OpenCLIP's text towers: heads = width / 64 (ViT-H/14: 1024 wide, 16 heads)


def text_key_from_open_clip(key: str, num_layers: int) -> str | tuple[str, str, str] | None:
    """Map an OpenCLIP text-tower name (the part after `cond_stage_model.model.`) to CLIPTextModel's, for a model of
    `num_layers` blocks: a fused `attn.in_proj_weight` / `_bias` goes to the q, k, v projections (in that order);
    None for what SD 2 does not use (OPEN_CLIP_UNUSED and blocks from `num_layers` on: SD 2 conditions on the
    penultimate block, `layer: "penultimate"` in Stability's configs, so the file's last block is never run)."""
    if key in _OPEN_CLIP_TOP:
        return _OPEN_CLIP_TOP[key]
    if key in OPEN_CLIP_UNUSED:
        return None
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if m is None:
        raise ValueError(f"not an OpenCLIP text-tower key: {key}")
    n, rest = int(m.group(1)), m.group(2)
    if n >= num_layers:
        return None
    layer = f"encoder.layers.{n}."
    fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
    if fused:
        return tuple(f"{layer}self_attn.{p}_proj.{fused.group(1)}" for p in "qkv")
    for old, new in _OPEN_CLIP_BLOCK.items():
        if rest.startswith(old + "."):
            return layer + new + rest[len(old):]
    raise ValueError(f"not an OpenCLIP text-tower key: {key}")


def open_clip_text_config(file: TensorFile, prefix: str) -> dict:
    """The CLIPTextModel config of a single file's OpenCLIP text tower, from its shapes: one block fewer than the
    file holds (text_key_from_open_clip), exact GELU (OpenCLIP's nn.GELU, not CLIP's quick_gelu), LayerNorm eps 1e-5
    (PyTorch's default, which OpenCLIP keeps), heads 64 wide."""
    def shape(name):
        if prefix + name not in keys:
            raise WeightsError(f"{file.path}: missing key {prefix + name!r} for the OpenCLIP text tower")
        return file.shape(prefix + name)

    keys = set(file.keys())
    blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))}
    vocab, width = shape("token_embedding.weight")
    return dict(vocab_size=vocab, hidden_size=width, intermediate_size=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                num_hidden_layers=len(blocks) - 1, num_attention_heads=width // OPEN_CLIP_HEAD_WIDTH,
                max_position_embeddings=shape("positional_embedding")[0], hidden_act="gelu", layer_norm_eps=1e-5)


def _open_clip_names(model: nn.Module, file: TensorFile, prefix: str) -> dict[str, str | tuple[str, ...]]:
    """File key -> model name(s) for an OpenCLIP text tower; the keys SD 2 does not use are left out."""
    ours = {_strip_text_model(k): k for k in model.state_dict()}
    n = model.config.num_hidden_layers
    names = {}
    for k in file.keys():
        if k.startswith(prefix):
            rule = _mapped(lambda key: text_key_from_open_clip(key[len(prefix):], n), k, file)
            if rule is not None:
                names[k] = tuple(ours.get(r, r) for r in rule) if isinstance(rule, tuple) else ours.get(rule, rule)
    return names


def _load_single_file(path: Path, components, device, dtype, prediction_type: str | None) -> StableDiffusion:
    file = TensorFile(path)
    prefixes = _generation(file)
    sd2 = prefixes is SD2_PREFIX
    unet_cfg, assumed = single_file_config(file)
    keys = file.keys()
    if prediction_type is not None:  # given: not assumed
        assumed = {k: v for k, v in assumed.items() if k != "prediction_type"}
    tokenizer = load_tokenizer(pad_token=PAD_SD2 if sd2 else EOS)
    sd = StableDiffusion(None, None, tokenizer, make_alpha_bar(), source=str(path), assumed=assumed,
                         prediction_type=prediction_type or assumed.get("prediction_type", "epsilon"))
    if "vae" in components:
        cfg = VAEConfig()
        names = {k: vae_key_from_ldm(k, len(cfg.block_out_channels)) for k in keys if k.startswith(prefixes["vae"])}
        sd.vae = load_into(_empty_vae(cfg), file, names, device=device, dtype=dtype["vae"]).eval()
    if "text_encoder" in components:
        prefix = prefixes["text_encoder"]
        model = _empty_text_encoder(open_clip_text_config(file, prefix) if sd2 else None)
        names = _open_clip_names(model, file, prefix) if sd2 else _text_names(model, keys, prefix)
        sd.text_encoder = load_into(model, file, names, device=device, dtype=dtype["text_encoder"],
                                    init_fresh=_fill_position_ids).eval()
    if "unet" in components:
        names = {k: _mapped(unet_key_from_ldm, k, file) for k in keys if k.startswith(prefixes["unet"])}
        sd.unet = load_into(_empty_unet(unet_cfg), file, names, device=device, dtype=dtype["unet"],
                            keep_fresh=is_temporal_param, init_fresh=_init_temporal).eval()
    return sd


def _component_file(folder: Path, component: str) -> tuple[TensorFile, dict]:
    weights, config = FOLDER_FILES[component]
    sub = folder / component
    found = next((sub / w for w in weights if (sub / w).is_file()), None)
    if found is None:
        raise WeightsError(f"{sub}: no weights file (expected one of {', '.join(weights)})")
    if not (sub / config).is_file():
        raise WeightsError(f"{sub}: missing {config}")
    return TensorFile(found), json.loads((sub / config).read_text(encoding="utf-8"))


def checked_prediction_type(value, where: Path | None = None) -> str:
    """`value` if it is a prediction type we build (apla.scheduler.PREDICTION_TYPES), else WeightsError naming the
    file it came from (a scheduler config), if any."""
    if value not in PREDICTION_TYPES:
        raise WeightsError(f"{f'{where}: ' if where else ''}prediction_type {value!r} is not supported (one of "
                           f"{', '.join(PREDICTION_TYPES)})")
    return value


def _load_folder(folder: Path, components, device, dtype, prediction_type: str | None) -> StableDiffusion:
    sched = folder / "scheduler" / "scheduler_config.json"
    s = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else {}
    alpha_bar = make_alpha_bar(s.get("num_train_timesteps", 1000), s.get("beta_start", 0.00085),
                               s.get("beta_end", 0.012), s.get("beta_schedule", "scaled_linear"))
    prediction_type = prediction_type or checked_prediction_type(s.get("prediction_type", "epsilon"), sched)
    sd = StableDiffusion(None, None, load_tokenizer(folder), alpha_bar, source=str(folder),
                         prediction_type=prediction_type)
    if "vae" in components:
        file, cfg = _component_file(folder, "vae")
        names = {k: k for k in file.keys()}
        sd.vae = load_into(_empty_vae(VAEConfig.from_diffusers(cfg)), file, names, device=device,
                           dtype=dtype["vae"]).eval()
    if "text_encoder" in components:
        file, cfg = _component_file(folder, "text_encoder")
        model = _empty_text_encoder(cfg)
        names = _text_names(model, file.keys())
        sd.text_encoder = load_into(model, file, names, device=device, dtype=dtype["text_encoder"],
                                    init_fresh=_fill_position_ids).eval()
    if "unet" in components:
        file, cfg = _component_file(folder, "unet")
        names = {k: k for k in file.keys()}
        # an SD folder's U-Net is inflated here, its temporal layers new; a Tune-A-Video folder's (or any whose file
        # holds temporal weights) is loaded as it was tuned, every temporal weight from its file (one missing is an
        # error) and none made afresh
        tuned = is_tune_a_video(cfg) or any(map(is_temporal_param, names))
        sd.unet = load_into(_empty_unet(UNetConfig.from_diffusers(cfg)), file, names, device=device,
                            dtype=dtype["unet"], keep_fresh=(lambda name: False) if tuned else is_temporal_param,
                            init_fresh=None if tuned else _init_temporal).eval()
    return sd


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_hub_id(repo_id: str, components=COMPONENTS, revision: str | None = None) -> Path:
    """A hub id -> a local diffusers folder, through huggingface_hub's cache (downloads only what is needed:
    the requested components' configs and safetensors, the tokenizer and the scheduler config)."""
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "tokenizer/*", "scheduler/*"]
    for c in components:
        patterns += [f"{c}/config.json", f"{c}/{FOLDER_FILES[c][0][0]}"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repository, no access: the hub's message, joined into one line
        reason = " ".join(str(e).split())
        raise WeightsError(f"{repo_id}: could not be resolved as a hub id ({type(e).__name__}: {reason})") from None


def load_stable_diffusion(
    source: str | Path,
    device="cpu",
    dtype: torch.dtype | dict[str, torch.dtype] = torch.float32,
    components: Iterable[str] = COMPONENTS,
    prediction_type: str | None = None,
) -> StableDiffusion:
    """SD v1.x or 2.x from a single file, a diffusers folder or a hub id; `components` picks what to build, `dtype`
    the dtype of every network, or of each component it names (float32 for the others).

    `prediction_type` says what the U-Net predicts ("epsilon" or "v_prediction"); None takes a folder's
    scheduler/scheduler_config.json (epsilon when it names none, as diffusers does) and, for a single file, which
    carries no config, "epsilon" (every SD v1.x file is an eps-model), or for an SD 2.x file its assumed variant's
    (single_file_config). Given, it wins over the folder's, so a
    folder whose config is wrong or names a type we do not build can still be read as what it is. A type we do
    not build ("sample") is a WeightsError naming where it came from.

    Returns a `StableDiffusion` with `.vae`, `.text_encoder`, `.tokenizer`, `.alpha_bar`, `.unet` (None
    for components not asked for), `.source`, `.prediction_type` and `.assumed` (`assumption_note` says it in one
    line).
    """
    components = tuple(components)
    if prediction_type is not None:
        checked_prediction_type(prediction_type)
    source = model_path(source) or source  # a bundled model's name ("micro") -> its folder (apla.assets)
    unknown = [c for c in [*components, *(dtype if isinstance(dtype, dict) else ())] if c not in COMPONENTS]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}: choose from {COMPONENTS}")
    dtype = {c: dtype.get(c, torch.float32) if isinstance(dtype, dict) else dtype for c in COMPONENTS}
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, components, device, dtype, prediction_type)
    if path.is_file():
        return _load_single_file(path, components, device, dtype, prediction_type)
    if isinstance(source, str) and HUB_ID.match(source) and path.suffix not in (".safetensors", ".ckpt", ".bin"):
        sd = _load_folder(resolve_hub_id(source, components), components, device, dtype, prediction_type)
        sd.source = source
        return sd
    raise WeightsError(f"{source}: neither a checkpoint file, a diffusers folder nor a hub id 'org/name'")

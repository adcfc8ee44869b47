"""Stable Diffusion 2.x on random weights in small configs: the U-Net (linear projections, a head count per level,
upcast attention) against diffusers' UNet2DConditionModel; the OpenCLIP text tower of a single file against the same
weights in a transformers folder, against diffusers' convert_open_clip_checkpoint and against OpenCLIP's forward
written out (the penultimate block after ln_final, exact GELU); SD 2's "!" padding; the VAE; a whole SD 2 folder; what
a single SD 2 file is taken to be. Full size: tests/sd/test_full_size_sd2.py (marked slow)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import apla
from apla.sd.attention import Attention, attention
from apla.sd.text import EOS, encode_prompt, load_tokenizer, tokenize
from apla.sd.unet import UNet3DConditionModel, UNetConfig, is_temporal_param
from apla.sd.vae import AutoencoderKL, VAEConfig
from apla.sd.weights import (SD2_UNET, WeightsError, assumption_note, single_file_config, text_key_from_open_clip,
                             unet_key_from_ldm)
from tests.conftest import write_checkpoint
from tests.helpers.sd2 import (OPEN_CLIP, SCHEDULER_2, UNET_2_1, VAE_2, random_open_clip, sd2_entries,
                               write_tokenizer)
from tests.sd.test_text import PROMPTS, reference_ids, reference_vocab_and_merges
from tests.helpers.inflation import temporal_output_zero
from tests.sd.test_unet import _randomise

diffusers = pytest.importorskip("diffusers", reason="diffusers (a dev extra) is the reference")
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint  # noqa: E402

# A small SD 2-style U-Net: linear projections, upcast attention, and a head count per level whose head widths differ
# (16, 8, 16 for down 0, down 1, mid), so a head count taken from the wrong level changes the output.
TINY2_UNET = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 8, 4),
                  cross_attention_dim=128, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  use_linear_projection=True, upcast_attention=True, sample_size=8)
TINY2_VAE = dict(block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, latent_channels=4,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32)
# A small OpenCLIP text tower with SD 2's depth (24 blocks in the file, 23 used), heads 64 wide (2 here)
WIDTH, BLOCKS, MLP = 128, 24, 256


@pytest.fixture(scope="module")
def tower():
    """The small OpenCLIP text tower: its tensors (full single-file names), and a text-only SD 2 single file."""
    return random_open_clip(WIDTH, BLOCKS, MLP, seed=3)


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory, tower):
    """A small SD 2-style diffusers folder: U-Net and VAE written by diffusers, the text encoder by transformers
    (holding diffusers' conversion of the OpenCLIP tower), SD 2's tokenizer folder, a v-prediction scheduler."""
    root = tmp_path_factory.mktemp("tiny-sd2")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY2_UNET).eval()
    _randomise(unet.named_parameters(), seed=1)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae = diffusers.AutoencoderKL(**TINY2_VAE).eval()
    _randomise(vae.named_parameters(), seed=2)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    text = reference_text_model(tower)
    text.save_pretrained(root / "text_encoder", safe_serialization=True)
    write_tokenizer(root)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_2,
                                                                         "prediction_type": "v_prediction"}))
    return root, unet, vae, text


def text_config(**overrides):
    return CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=BLOCKS - 1,
                          num_attention_heads=WIDTH // 64, max_position_embeddings=77, hidden_act="gelu",
                          layer_norm_eps=1e-5, **overrides)


def reference_text_model(tower, **overrides) -> CLIPTextModel:
    """transformers' CLIPTextModel holding diffusers' own conversion of the OpenCLIP tower."""
    model = CLIPTextModel(text_config(**overrides)).eval()
    converted = convert_open_clip_checkpoint(model, tower)
    assert not any("text_projection" in k or "resblocks" in k for k in converted)
    model.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=False)
    ours = {k.removeprefix("text_model.") for k in model.state_dict()} - {"embeddings.position_ids"}
    assert ours == {k.removeprefix("text_model.") for k in converted}  # every parameter came from the file
    return model


def open_clip_states(tower, ids, blocks, act=F.gelu, final_norm=True):
    """OpenCLIP's text forward written out in float64 from the file's tensors: token + positional embedding, `blocks`
    residual blocks (causal nn.MultiheadAttention with the fused in_proj, an MLP with `act`), then ln_final."""
    t = {k[len(OPEN_CLIP):]: v.double() for k, v in tower.items()}
    x = t["token_embedding.weight"][ids] + t["positional_embedding"]  # (B, 77, W)
    causal = torch.full((77, 77), float("-inf"), dtype=torch.float64).triu(1)
    mha = torch.nn.MultiheadAttention(WIDTH, WIDTH // 64, batch_first=True, dtype=torch.float64)
    for n in range(blocks):
        b = {k[len(f"transformer.resblocks.{n}."):]: v for k, v in t.items() if k.startswith(f"transformer.resblocks.{n}.")}
        mha.load_state_dict({"in_proj_weight": b["attn.in_proj_weight"], "in_proj_bias": b["attn.in_proj_bias"],
                             "out_proj.weight": b["attn.out_proj.weight"], "out_proj.bias": b["attn.out_proj.bias"]})
        h = F.layer_norm(x, (WIDTH,), b["ln_1.weight"], b["ln_1.bias"])
        x = x + mha(h, h, h, attn_mask=causal, need_weights=False)[0]
        h = F.layer_norm(x, (WIDTH,), b["ln_2.weight"], b["ln_2.bias"])
        x = x + F.linear(act(F.linear(h, b["mlp.c_fc.weight"], b["mlp.c_fc.bias"])), b["mlp.c_proj.weight"],
                         b["mlp.c_proj.bias"])
    return F.layer_norm(x, (WIDTH,), t["ln_final.weight"], t["ln_final.bias"]) if final_norm else x


def text_only_file(tmp_path, tower, name="v2-1_768-ema-pruned.safetensors"):
    """A single file holding only the OpenCLIP tower (enough to be told as SD 2.x and load its text encoder)."""
    save_file(tower, str(tmp_path / name))
    return tmp_path / name


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the U-Net --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm_over_frames", [True, False])
def test_unet_parity_with_diffusers_f1_and_identical_frames(sd2_folder, norm_over_frames):
    """Linear projections, a head count per level, upcast attention: the folder's U-Net, loaded in float64, gives
    diffusers' 2D U-Net output on one frame and on F identical frames (temporal output bias taken to zero)."""
    root, ref, _, _ = sd2_folder
    unet = apla.load_stable_diffusion(root, components=("unet",), dtype=torch.float64).unet
    unet.set_norm_over_frames(norm_over_frames)
    cfg = unet.config
    assert (cfg.use_linear_projection, cfg.upcast_attention, cfg.attention_head_dim, cfg.sample_size) == \
        (True, True, (2, 8, 4), 8)
    blocks = [m for m in unet.modules() if type(m).__name__ == "TransformerBlock"]
    assert sorted({b.attn1.heads for b in blocks}) == [2, 4, 8]
    assert all(b.attn_temp.heads == b.attn1.heads and b.attn_temp.upcast for b in blocks)  # the block's, as TAV's
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Linear)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 1, 8, 8, generator=g, dtype=torch.float64)
    t, context = torch.tensor([10, 700]), torch.randn(2, 77, 128, generator=g, dtype=torch.float64)
    with torch.no_grad(), temporal_output_zero(unet):
        eps_ref = ref.double()(z[:, :, 0], t, context).sample
        eps_f1 = unet(z, t, context)
        eps_f3 = unet(z.expand(-1, -1, 3, -1, -1).contiguous(), t, context)
        ref.float()
    assert eps_ref.abs().max() > 1e-2
    torch.testing.assert_close(eps_f1[:, :, 0], eps_ref, rtol=0, atol=1e-10)
    for i in range(3):
        torch.testing.assert_close(eps_f3[:, :, i], eps_ref, rtol=0, atol=1e-10)


def test_linear_projection_is_the_1x1_convolution_applied_after_the_reshape():
    """SD 2's Linear proj_in / proj_out hold the same numbers as SD v1's 1x1 convolutions: a U-Net with either,
    holding the same weights, gives the same output."""
    cfg = dict(block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=(2, 4), cross_attention_dim=16,
               norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    torch.manual_seed(0)
    conv = UNet3DConditionModel(UNetConfig(**cfg)).double().eval()
    _randomise(conv.named_parameters(), seed=4)
    linear = UNet3DConditionModel(UNetConfig(**cfg, use_linear_projection=True)).double().eval()
    linear.load_state_dict({k: v.flatten(1) if k.endswith(("proj_in.weight", "proj_out.weight")) else v
                            for k, v in conv.state_dict().items()})
    z, context = torch.randn(1, 4, 3, 8, 8, dtype=torch.float64), torch.randn(1, 77, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(linear(z, 5, context), conv(z, 5, context), rtol=0, atol=1e-12)


def test_upcast_attention_runs_in_float32_under_half_precision():
    """With `upcast`, bf16 inputs (under bf16 autocast) are attended in float32 and the output cast back: it equals
    float32 attention of the bf16 values exactly, which bf16 attention does not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16, generator=g).mul(4).bfloat16() for _ in range(3))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        up, plain = attention(q, k, v, upcast=True), attention(q, k, v, upcast=False)
    assert up.dtype == torch.bfloat16 and torch.equal(up, expected)
    assert not torch.equal(plain, expected)
    assert torch.equal(attention(q.float(), k.float(), v.float(), upcast=True),
                       F.scaled_dot_product_attention(q.float(), k.float(), v.float()))  # float32: unchanged
    attn = Attention(32, 4, upcast=True)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_full_size_unet_names_and_shapes_equal_diffusers_and_the_single_file_layout():
    """On the meta device: our SD 2.1 U-Net (less its temporal layers) has exactly the names and shapes of diffusers'
    UNet2DConditionModel of the published config, and every U-Net key of an SD 2 single file maps onto it with a
    fitting shape (Linear proj_in/proj_out, 1024-wide cross-attention)."""
    with torch.device("meta"):
        ours = UNet3DConditionModel(UNetConfig.from_diffusers(UNET_2_1))
        ref = diffusers.UNet2DConditionModel(**UNET_2_1)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if not is_temporal_param(k)}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert UNetConfig.from_diffusers(UNET_2_1) == UNetConfig(**SD2_UNET, upcast_attention=True, sample_size=96)
    ldm = {k: tuple(s) for k, s in sd2_entries().items() if k.startswith("model.diffusion_model.")}
    mapped = {unet_key_from_ldm(k): s for k, s in ldm.items()}
    assert len(mapped) == len(ldm) == len(shapes) and mapped == shapes
    print(f"\nSD 2.1 U-Net: {sum(math.prod(s) for s in shapes.values()):,} parameters")


# ---- the text tower ---------------------------------------------------------------------------------------------

def test_open_clip_single_file_matches_transformers_folder_diffusers_and_open_clip(tmp_path, tower, sd2_folder):
    """A single file's OpenCLIP tower, loaded by our converter: every tensor equals diffusers' conversion; its text
    states equal the same weights in a transformers folder, and OpenCLIP's own forward through the penultimate block
    and ln_final (float64); the last block's output, the states before ln_final and quick_gelu each differ."""
    root, _, _, ref = sd2_folder
    sd = apla.load_stable_diffusion(text_only_file(tmp_path, tower), components=("text_encoder",), dtype=torch.float64)
    text = sd.text_encoder
    assert (text.config.num_hidden_layers, text.config.hidden_act, text.config.num_attention_heads) == (23, "gelu", 2)
    theirs = {k.removeprefix("text_model."): v for k, v in reference_text_model(tower).state_dict().items()}
    for name, p in text.state_dict().items():
        torch.testing.assert_close(p, theirs[name.removeprefix("text_model.")].double(), rtol=0, atol=0)

    ids = tokenize(sd.tokenizer, PROMPTS[:3])
    folder = apla.load_stable_diffusion(root, components=("text_encoder",), dtype=torch.float64)
    with torch.no_grad():
        ours = encode_prompt(sd, PROMPTS[:3])
        torch.testing.assert_close(ours, encode_prompt(folder, PROMPTS[:3]), rtol=0, atol=1e-12)
        torch.testing.assert_close(ours.float(), ref(input_ids=ids).last_hidden_state, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours, open_clip_states(tower, ids, BLOCKS - 1), rtol=0, atol=1e-10)
        assert rel(ours, open_clip_states(tower, ids, BLOCKS)) > 1e-2  # all 24 blocks: not what SD 2 reads
        assert rel(ours, open_clip_states(tower, ids, BLOCKS - 1, final_norm=False)) > 1e-2
        quick = open_clip_states(tower, ids, BLOCKS - 1, act=lambda x: x * torch.sigmoid(1.702 * x))
        assert rel(ours, quick) > 1e-4


def test_open_clip_names_account_for_every_tensor_and_refuse_the_rest(tmp_path, tower):
    """text_projection, logit_scale and the last block are known and unused; the fused projection splits into q, k,
    v in that order; an unknown name and a missing block are refused in one line that names them."""
    assert text_key_from_open_clip("text_projection", 23) is None and text_key_from_open_clip("logit_scale", 23) is None
    assert text_key_from_open_clip("transformer.resblocks.23.mlp.c_fc.weight", 23) is None
    assert text_key_from_open_clip("transformer.resblocks.4.attn.in_proj_bias", 23) == tuple(
        f"encoder.layers.4.self_attn.{p}_proj.bias" for p in "qkv")
    assert text_key_from_open_clip("transformer.resblocks.0.mlp.c_proj.weight", 23) == "encoder.layers.0.mlp.fc2.weight"
    bad = {**tower, OPEN_CLIP + "transformer.resblocks.3.attn.q_proj.weight": torch.zeros(WIDTH, WIDTH)}
    with pytest.raises(WeightsError, match=r"unknown key 'cond_stage_model\.model\.transformer\.resblocks\.3\.attn"
                                           r"\.q_proj\.weight'") as e:
        apla.load_stable_diffusion(text_only_file(tmp_path, bad), components=("text_encoder",))
    assert "\n" not in str(e.value)
    gap = {k: v for k, v in tower.items() if ".resblocks.5." not in k}
    with pytest.raises(WeightsError, match=r"missing key 'encoder\.layers\.5\.") as e:
        apla.load_stable_diffusion(text_only_file(tmp_path, gap, "gap.safetensors"), components=("text_encoder",))
    skew = {**tower, OPEN_CLIP + "transformer.resblocks.2.attn.in_proj_weight": torch.zeros(2 * WIDTH, WIDTH)}
    with pytest.raises(WeightsError, match=r"wrong shape for .*resblocks\.2\.attn\.in_proj_weight'.*\[256, 128\]"):
        apla.load_stable_diffusion(text_only_file(tmp_path, skew, "skew.safetensors"), components=("text_encoder",))


def test_sd2_pads_with_exclamation_mark_which_changes_the_text_states(tmp_path, tower, sd2_folder):
    """SD 2's tokenizer pads with "!" (id 0): a single file gets it, a folder's tokenizer files say it. The ids are
    OpenCLIP's rule (BOS, BPE, EOS, zeros) for every prompt; transformers' CLIPTokenizer reading that folder agrees
    but on a "!" inside a prompt, which it too turns into id 0 (apla.sd.text._tokenizer_from). The states before the
    padding equal those of EOS padding (causal); at every padded position they differ."""
    root = sd2_folder[0]
    sd = apla.load_stable_diffusion(text_only_file(tmp_path, tower), components=("text_encoder",))
    vocab, merges, byte_char = reference_vocab_and_merges()
    prompts = [*PROMPTS, "wow!! a beach!"]
    ids = tokenize(sd.tokenizer, prompts)
    for prompt, row in zip(prompts, ids.tolist()):
        expected = reference_ids(prompt, vocab, merges, byte_char)
        assert row == expected + [0] * (77 - len(expected)), prompt
    folder_tok = load_tokenizer(root)
    assert folder_tok.pad_token_id == 0 and torch.equal(tokenize(folder_tok, prompts), ids)
    reference = CLIPTokenizer.from_pretrained(root / "tokenizer")
    theirs = reference(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    bang = ["!" in p for p in prompts]
    assert reference.pad_token_id == 0 and torch.equal(theirs[[not b for b in bang]], ids[[not b for b in bang]])
    assert not torch.equal(theirs[bang], ids[bang])
    assert sorted({*ids[-1].tolist()} - {*theirs[-1].tolist()}) == [256, 748]  # "!</w>", "!!</w>": OpenCLIP's

    eos_padded = tokenize(load_tokenizer(pad_token=EOS), PROMPTS[:1])
    n = len(reference_ids(PROMPTS[0], vocab, merges, byte_char))  # BOS .. EOS
    with torch.no_grad():
        ours = encode_prompt(sd, PROMPTS[:1])
        with_eos = sd.text_encoder(input_ids=eos_padded).last_hidden_state
    torch.testing.assert_close(ours[:, :n], with_eos[:, :n], rtol=0, atol=1e-6)
    assert (ours[:, n:] - with_eos[:, n:]).abs().amax(-1).min() > 1e-3  # every padded position


# ---- the VAE, a whole folder, what a single file is taken to be -------------------------------------------------

def test_vae_is_sd15s_architecture_and_the_folder_matches_diffusers(sd2_folder, sd15_manifest):
    """SD 2's published VAE config builds SD v1.5's network, names and shapes; a small SD 2-style folder's VAE
    equals diffusers' in float64."""
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig.from_diffusers(VAE_2))
    assert {k: list(v.shape) for k, v in vae.state_dict().items()} == sd15_manifest["diffusers"]["vae"]
    assert vae.scaling_factor == 0.18215
    root, _, ref, _ = sd2_folder
    ours = apla.load_stable_diffusion(root, components=("vae",), dtype=torch.float64).vae
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 16, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        ref.double()
        torch.testing.assert_close(ours.encode(x)[0], ref.encode(x).latent_dist.mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=0, atol=1e-10)
        ref.float()


def test_whole_sd2_folder_loads_with_its_sample_size_and_tokenizer(sd2_folder):
    root = sd2_folder[0]
    sd = apla.load_stable_diffusion(root)
    assert sd.assumed == {} and assumption_note(sd) is None  # a folder says what it is
    assert sd.unet.config.sample_size == 8 and sd.tokenizer.pad_token_id == 0
    context = encode_prompt(sd, ["a photo of a cat"])
    assert context.shape == (1, 77, 128)
    with torch.no_grad():
        assert sd.unet(torch.randn(1, 4, 2, 8, 8), 10, context).shape == (1, 4, 2, 8, 8)


@pytest.mark.parametrize("name, variant, said", [
    ("v2-1_768-ema-pruned.safetensors", "768-v", "its name"),
    ("v2-1_512-ema-pruned.safetensors", "512-base", "its name"),
    ("512-base-ema.safetensors", "512-base", "its name"),
    ("my-dreambooth.safetensors", "768-v", "no word in its name"),
])
def test_single_sd2_file_is_told_by_its_keys_and_its_variant_assumed_from_its_name(tmp_path, name, variant, said):
    """Full-size names and shapes (a sparse file: no data read): SD 2 is told by its OpenCLIP keys; the U-Net config
    is SD 2's with upcast attention; prediction type and sample size follow the variant the name gives, said in one
    note line; a prediction type given wins."""
    path = write_checkpoint(tmp_path / name, sd2_entries(), fill="zeros")
    cfg, assumed = single_file_config(path)
    v = {"768-v": ("v_prediction", 96), "512-base": ("epsilon", 64)}[variant]
    assert (assumed["variant"], assumed["from"], assumed["prediction_type"], assumed["sample_size"]) == (variant, said, *v)
    assert cfg == UNetConfig(**SD2_UNET, upcast_attention=True, sample_size=v[1])
    sd = apla.load_stable_diffusion(path, components=())
    assert sd.assumed == assumed and sd.tokenizer.pad_token_id == 0 and sd.prediction_type == v[0]
    note = assumption_note(sd)
    assert "\n" not in note and str(path) in note and variant in note and v[0] in note and f"{8 * v[1]} px" in note
    other = {"v_prediction": "epsilon", "epsilon": "v_prediction"}[v[0]]  # a type given wins, and is said as given
    sd = apla.load_stable_diffusion(path, components=(), prediction_type=other)
    assert sd.prediction_type == other and f"{other} (as given)" in assumption_note(sd)

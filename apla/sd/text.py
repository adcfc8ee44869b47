"""The prompt side of Stable Diffusion: CLIP's BPE tokenizer and text encoder (via transformers).

APLA conditions its U-Net on a text query q (APLA, Algorithm 1: "Encode x_0 and q ..."); as in
Stable Diffusion v1 the condition is the last hidden state of CLIP ViT-L/14's text transformer over
77 tokens, `context` of shape (B, 77, 768). SD 2.x conditions on OpenCLIP ViT-H/14's text tower instead, built
here as a CLIPTextModel one block shorter than OpenCLIP's (`apla.sd.weights`), which gives (B, 77, 1024).
No APLA equation lives here.

- `load_tokenizer(folder=None, pad_token=EOS)`: the folder's `tokenizer/` (vocab.json + merges.txt, and the pad
  token its tokenizer_config.json names) or, without one, the CLIP BPE vocabulary shipped in
  `apla/assets/clip_bpe/` (MIT, (c) OpenAI; see its LICENSE); SD 2.x's tokenizer is the same vocabulary padding
  with `PAD_SD2`.
- `build_text_encoder(config)`: a transformers `CLIPTextModel` built from a config dict, never
  downloaded; its weights are loaded by `apla.sd.weights`.
- `encode_prompt(sd, prompts)` -> (B, 77, D) last hidden states, as SD conditions on.
"""

from __future__ import annotations

import gzip
import json
import sys
from importlib import resources
from pathlib import Path

import torch

MAX_LENGTH = 77  # SD v1 pads / truncates every prompt to 77 tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 49406, 49407; EOS is also SD v1's pad token
# SD 2.x pads with "!" (id 0): OpenCLIP's tokenizer fills with zeros, and SD 2's diffusers tokenizer names "!". With
# no attention mask the padding is read, so it changes the text states (not only the ids after EOS).
PAD_SD2 = "!"
NUM_MERGES = 48894  # lines 2 .. 48895 of the shipped BPE file

# SD v1.5's text encoder (CLIP ViT-L/14 text tower), as in text_encoder/config.json.
TEXT_ENCODER_CONFIG = dict(
    vocab_size=49408,  # SD v1.5: 49408
    hidden_size=768,  # SD v1.5: 768 (= the U-Net's cross_attention_dim)
    intermediate_size=3072,  # SD v1.5: 3072
    num_hidden_layers=12,  # SD v1.5: 12
    num_attention_heads=12,  # SD v1.5: 12
    max_position_embeddings=77,  # SD v1.5: 77
    hidden_act="quick_gelu",  # SD v1.5: quick_gelu
    layer_norm_eps=1e-5,  # SD v1.5: 1e-5
)


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read."""


def byte_alphabet() -> list[str]:
    """The 256 printable characters that stand for the bytes 0..255 in byte-level BPE, in vocabulary order:
    bytes that are printable Latin-1 keep their own character and come first; the other bytes are given
    the characters U+0100 onward, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def clip_vocab_and_merges(gz_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's 49,408-token vocabulary and its 48,894 merges from the shipped BPE file: the 256 byte
    characters, the same with `</w>`, one token per merge (its halves joined), then BOS and EOS."""
    if gz_path is None:
        gz_path = resources.files("apla") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : NUM_MERGES + 1]  # line 0 is a header
    merges = [tuple(line.split()) for line in lines]
    chars = byte_alphabet()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer_from(vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str) -> CLIPTokenizer:
    from transformers import CLIPTokenizer  # imported when first needed: transformers takes seconds to import

    # Explicit vocab / merges: CLIPTokenizer(vocab_file=..., merges_file=...) is not honoured by every
    # transformers version, so file paths are never handed to it.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)
    # The pad token is set after construction, for padding only. Handed to the constructor (as transformers reads SD
    # 2's diffusers tokenizer), "!" becomes a special token that every "!" of a prompt turns into as well: "beach!"
    # gives ..., 2117, 0, where OpenCLIP's tokenizer, which SD 2 was trained with, gives ..., 2117, 256 ("!</w>").
    # We keep OpenCLIP's ids; the prompt's text is tokenized alike for every pad token.
    tok.pad_token = pad_token
    return tok


def _folder_pad_token(sub: Path) -> str | None:
    """The pad token a tokenizer folder names: special_tokens_map.json's, else tokenizer_config.json's (the order
    in which transformers reads them), as a plain string or an AddedToken's dict."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (sub / name).is_file():
            pad = json.loads((sub / name).read_text(encoding="utf-8")).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return None


def load_tokenizer(folder: str | Path | None = None, pad_token: str = EOS) -> CLIPTokenizer:
    """CLIP's tokenizer from `folder/tokenizer/` (vocab.json + merges.txt) when present, else the shipped one.
    It pads with `pad_token` (EOS, SD v1's; PAD_SD2 for SD 2.x), unless the folder names its own."""
    sub = Path(folder) / "tokenizer" if folder is not None else None
    if sub is None or not sub.is_dir():
        return _tokenizer_from(*clip_vocab_and_merges(), pad_token)
    vocab_file, merges_file = sub / "vocab.json", sub / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerError(f"{sub}: missing {f.name} (a CLIP tokenizer folder holds vocab.json and merges.txt)")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    pad_token = _folder_pad_token(sub) or pad_token
    if pad_token not in vocab:
        raise TokenizerError(f"{sub}: its pad token {pad_token!r} is not in vocab.json")
    return _tokenizer_from(vocab, merges, pad_token)


def build_text_encoder(config: dict | None = None) -> CLIPTextModel:
    """A transformers CLIPTextModel built from a config dict (SD v1.5's by default), randomly initialised."""
    from transformers import CLIPTextConfig, CLIPTextModel  # imported when first needed: it takes seconds

    cfg = CLIPTextConfig.from_dict({**TEXT_ENCODER_CONFIG, **(config or {})})
    return CLIPTextModel(cfg).eval()


def tokenize(tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Prompts -> ids (B, 77): BOS, the tokens (truncated), EOS, then the tokenizer's pad token (EOS for SD v1, "!" for
    SD 2.x). A prompt longer than that is said in one line on stderr, since what CLIP does not read does not condition
    the U-Net."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    for p in prompts:
        n = len(tokenizer.tokenize(p)) + 2  # + BOS and EOS
        if n > MAX_LENGTH:
            print(f"apla: warning: the prompt {p[:40]!r}... is {n} tokens long; CLIP reads the first {MAX_LENGTH}, the "
                  "rest is cut", file=sys.stderr)
    out = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt")
    return out.input_ids


@torch.no_grad()
def encode_prompt(sd, prompts: str | list[str]) -> torch.Tensor:
    """`context` for the U-Net: CLIP's last hidden states (B, 77, D) for the prompts (D = 768 for SD v1.5, 1024 for
    SD 2.x, whose tower is built without OpenCLIP's last block, so that this is its penultimate block after ln_final).

    SD uses no attention mask: padding tokens are attended to (CLIP's causal mask only). APLA "builds upon
    pre-trained stable diffusion networks", so its text condition is the base model's.
    """
    ids = tokenize(sd.tokenizer, prompts).to(sd.text_encoder.device)  # (B, 77)
    return sd.text_encoder(input_ids=ids).last_hidden_state  # (B, 77, D)

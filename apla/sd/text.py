"""The prompt side of Stable Diffusion v1: CLIP's BPE tokenizer and text encoder (via transformers).

APLA conditions its U-Net on a text query q (APLA, Algorithm 1: "Encode x_0 and q ..."); as in
Stable Diffusion v1 the condition is the last hidden state of CLIP ViT-L/14's text transformer over
77 tokens, `context` of shape (B, 77, 768). No APLA equation lives here.

- `load_tokenizer(folder=None)`: the folder's `tokenizer/` (vocab.json + merges.txt) or, without one,
  the CLIP BPE vocabulary shipped in `apla/assets/clip_bpe/` (MIT, (c) OpenAI; see its LICENSE).
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

MAX_LENGTH = 77  # SD v1 pads / truncates every prompt to 77 tokens
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 49406, 49407; EOS is also the pad token
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


def _tokenizer_from(vocab: dict[str, int], merges: list[tuple[str, str]]) -> CLIPTokenizer:
    # Explicit vocab / merges: CLIPTokenizer(vocab_file=..., merges_file=...) is not honoured by every
    # transformers version, so file paths are never handed to it.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_LENGTH)


def load_tokenizer(folder: str | Path | None = None) -> CLIPTokenizer:
    """CLIP's tokenizer from `folder/tokenizer/` (vocab.json + merges.txt) when present, else the shipped one."""
    sub = Path(folder) / "tokenizer" if folder is not None else None
    if sub is None or not sub.is_dir():
        return _tokenizer_from(*clip_vocab_and_merges())
    vocab_file, merges_file = sub / "vocab.json", sub / "merges.txt"
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerError(f"{sub}: missing {f.name} (a CLIP tokenizer folder holds vocab.json and merges.txt)")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return _tokenizer_from(vocab, merges)


def build_text_encoder(config: dict | None = None) -> CLIPTextModel:
    """A transformers CLIPTextModel built from a config dict (SD v1.5's by default), randomly initialised."""
    cfg = CLIPTextConfig.from_dict({**TEXT_ENCODER_CONFIG, **(config or {})})
    return CLIPTextModel(cfg).eval()


def tokenize(tokenizer: CLIPTokenizer, prompts: str | list[str]) -> torch.Tensor:
    """Prompts -> ids (B, 77): BOS, the tokens (truncated), EOS, then EOS as padding. A prompt longer than that is
    said in one line on stderr, since what CLIP does not read does not condition the U-Net."""
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
    """`context` for the U-Net: CLIP's last hidden states (B, 77, D) for the prompts (D = 768 for SD v1.5).

    SD v1 uses no attention mask: padding tokens are attended to (CLIP's causal mask only). APLA "builds upon
    pre-trained stable diffusion networks", so its text condition is SD v1's.
    """
    ids = tokenize(sd.tokenizer, prompts).to(sd.text_encoder.device)  # (B, 77)
    return sd.text_encoder(input_ids=ids).last_hidden_state  # (B, 77, D)

"""apla.sd.text: the shipped CLIP tokenizer against an independent byte-level BPE written here, and the text encoder."""
import gzip
import json
import re
from importlib import resources

import pytest
import torch
from transformers import CLIPTokenizer

from apla.sd.text import MAX_LENGTH, TEXT_ENCODER_CONFIG, build_text_encoder, encode_prompt, load_tokenizer, tokenize

PROMPTS = [
    "a photo of a cat",
    "A Man Riding a Horse, on the BEACH!",
    "it's 3 o'clock... don't   panic?!",
    "Jeep car driving through the snow (high quality), 4k, 1080p",
    "naïve Café — émigré's résumé; x_y #tag @user",
    "",
]


def reference_vocab_and_merges():
    """CLIP's vocabulary as the BPE file's README describes it, built independently of apla.sd.text."""
    gz = resources.files("apla") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(gz, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:48895]]
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    byte_char, extra = {}, 0
    for b in range(256):
        if b in keep:
            byte_char[b] = chr(b)
        else:
            byte_char[b] = chr(256 + extra)
            extra += 1
    chars = [byte_char[b] for b in keep] + [byte_char[b] for b in range(256) if b not in keep]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, merges, byte_char


def reference_ids(text, vocab, merges, byte_char):
    """CLIP's BPE by hand: lowercase, split into words, bytes -> characters, merge the lowest-ranked pair."""
    rank = {m: i for i, m in enumerate(merges)}
    text = re.sub(r"\s+", " ", text).strip().lower()
    words = re.findall(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", text)
    ids = [vocab["<|startoftext|>"]]
    for word in words:
        sym = [byte_char[b] for b in word.encode("utf-8")]
        sym[-1] += "</w>"
        while len(sym) > 1:
            pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
            best, i = min(pairs)
            if best == 1 << 30:
                break
            sym[i : i + 2] = [sym[i] + sym[i + 1]]
        ids += [vocab[s] for s in sym]
    return ids + [vocab["<|endoftext|>"]]


@pytest.fixture(scope="module")
def reference():
    return reference_vocab_and_merges()


def test_shipped_tokenizer_special_ids_and_padding():
    tok = load_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert len(tok) == TEXT_ENCODER_CONFIG["vocab_size"]
    ids = tokenize(tok, ["a photo of a cat", "word " * 200])
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0, 0] == 49406 and (ids[0, 6:] == 49407).all()  # bos, 5 tokens, eos, then eos padding
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated, still ends with eos


def test_shipped_tokenizer_matches_reference_bpe_and_explicit_clip_tokenizer(reference):
    vocab, merges, byte_char = reference
    explicit = CLIPTokenizer(vocab=vocab, merges=merges)
    shipped = load_tokenizer()
    ids = tokenize(shipped, PROMPTS)
    for prompt, row in zip(PROMPTS, ids.tolist()):
        expected = reference_ids(prompt, vocab, merges, byte_char)
        assert row[: len(expected)] == expected, prompt
        assert row[len(expected):] == [49407] * (MAX_LENGTH - len(expected))
        assert explicit(prompt).input_ids == expected, prompt
    # Stable Diffusion's published ids for the classic prompt
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_folder_tokenizer_reads_vocab_json_and_merges_txt(tmp_path, reference):
    vocab, merges, _ = reference
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "tokenizer" / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    assert torch.equal(tokenize(load_tokenizer(tmp_path), PROMPTS), tokenize(load_tokenizer(), PROMPTS))


def test_full_size_text_encoder_count_and_names_equal_sd15_manifest(sd15_manifest):
    with torch.device("meta"):
        model = build_text_encoder()
    names = {k.removeprefix("text_model."): list(v.shape) for k, v in model.state_dict().items()}
    manifest = {k.removeprefix("text_model."): v for k, v in sd15_manifest["diffusers"]["text_encoder"].items()}
    assert names == manifest
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == sd15_manifest["param_counts_millions"]["text_encoder"]


def test_encode_prompt_gives_last_hidden_states_over_77_tokens():
    class SD:  # the two fields encode_prompt reads
        tokenizer = load_tokenizer()
        text_encoder = build_text_encoder(dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                               num_attention_heads=4))

    context = encode_prompt(SD, ["a photo of a cat", "A Man Riding a Horse, on the BEACH!"])
    assert context.shape == (2, MAX_LENGTH, 32)
    ids = tokenize(SD.tokenizer, ["a photo of a cat", "A Man Riding a Horse, on the BEACH!"])
    out = SD.text_encoder(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(context, out.last_hidden_state)
    # SD conditions on the states after CLIP's final layer norm, not on the last block's raw output
    torch.testing.assert_close(context, SD.text_encoder.final_layer_norm(out.hidden_states[-1]))
    assert not torch.allclose(context, out.hidden_states[-1])

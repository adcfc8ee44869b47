"""Tune-A-Video's YAML configs (its configs/*.yaml, and LOVEU-TGVE's per-video files) read as they are.

Each of its fields maps onto a TrainConfig field (`FIELDS`, `TRAIN_DATA`, `VALIDATION_DATA`; height and width onto
`size` as [height, width]); APLA's parts keep their defaults, and an `apla:` table of APLAConfig fields changes them.
Three keys of diffusers' training scripts are read beside its own (report_to, lr_num_cycles, lr_power). A field that
means nothing here is accepted with one note line when it holds Tune-A-Video's value (`IGNORED`); one that asks for
what we do not do, and any other key, is a ValueError naming it.
"""
from __future__ import annotations

# top-level field -> TrainConfig field
FIELDS = {
    "pretrained_model_path": "pretrained", "output_dir": "output_dir", "validation_steps": "sample_every",
    "trainable_modules": "trainable", "max_train_steps": "max_steps", "learning_rate": "lr",
    "adam_beta1": "adam_beta1", "adam_beta2": "adam_beta2", "adam_weight_decay": "weight_decay",
    "adam_epsilon": "adam_epsilon", "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "checkpointing_steps": "checkpoint_every", "mixed_precision": "mixed_precision", "seed": "seed",
    "lr_scheduler": "lr_scheduler", "lr_warmup_steps": "lr_warmup_steps",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    # diffusers' training scripts' keys, which Tune-A-Video's lacks
    "report_to": "report_to", "lr_num_cycles": "lr_num_cycles", "lr_power": "lr_power",
}
TRAIN_DATA = {"video_path": "video", "prompt": "prompt", "n_sample_frames": "frames", "sample_start_idx": "start",
              "sample_frame_rate": "stride"}
VALIDATION_DATA = {"prompts": "edit_prompts", "num_inference_steps": "sample_steps", "guidance_scale": "guidance"}
# Fields with one value that works here; any other value is an error saying why
ONLY = {
    "train_batch_size": (1, "one clip is one batch"),
    "resume_from_checkpoint": (None, "continue a run with train.py --resume"),
    "use_inv_latent": (True, "sampling starts from the inverted clip; sample.py --no-inversion starts from noise"),
}
# Fields accepted with a note: what they do in Tune-A-Video has no counterpart here
IGNORED = {
    "use_8bit_adam": "bitsandbytes' 8-bit AdamW is not used; AdamW in float32",
    "enable_xformers_memory_efficient_attention": "attention is torch's scaled_dot_product_attention",
    "scale_lr": "the learning rate is as given (Tune-A-Video's multiplies it by gradient_accumulation_steps)",
    "num_inv_steps": "inversion takes num_inference_steps, as many as sampling",
}
# train_data's height and width, when only one is given: the other is TuneAVideoDataset's default. Tune-A-Video's
# reader resizes each frame to width x height (the aspect ratio is not kept); ours scales it to cover the size and
# crops the centre (apla.video.resize_center_crop), so a clip of another aspect ratio is cropped, not stretched.
TAV_SIDE = 512
FLOATS = ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm",
          "guidance_scale", "lr_power")  # YAML 1.1 reads "3e-5" (no dot) as a string


def from_tuneavideo(values: dict) -> tuple[dict, list[str]]:
    """TrainConfig values of a Tune-A-Video config, and the notes to print; ValueError naming a key it cannot map."""
    out, notes, shapes = {}, [], {}
    for key, value in values.items():
        if key in ("train_data", "validation_data"):
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a table, got {value!r}")
            shapes[key] = section(key, value, out, notes)
        elif key == "apla":
            out["apla"] = value
        else:
            field(key, value, out, notes)
    given = [s for s in shapes.values() if s]  # samples are the training clip's frames, inverted: one shape
    if len(given) == 2 and any(a is not None and b is not None and a != b for a, b in zip(*given)):
        raise ValueError(f"validation_data's video_length, height and width {shapes['validation_data']} differ "
                         f"from train_data's {shapes['train_data']}")
    _, height, width = [next((v for v in vs if v is not None), None) for vs in zip(*given)] or (None, None, None)
    if height is not None or width is not None:  # a side left out is Tune-A-Video's default
        out["size"] = [TAV_SIDE if height is None else height, TAV_SIDE if width is None else width]
    if "lr" in out:  # D learns at the U-Net's rate, as in apla.config.SD_V15
        out["disc_lr"] = out["lr"]
    return out, notes


def section(name: str, values: dict, out: dict, notes: list) -> tuple | None:
    """Map train_data or validation_data into `out`; returns its (frames, height, width), or None if it gives none."""
    fields = TRAIN_DATA if name == "train_data" else VALIDATION_DATA
    for key, value in values.items():
        if key in fields:
            out[fields[key]] = number(key, value)
        elif key not in ("height", "width", "video_length"):
            field(key, value, out, notes, f"{name}.")
    shape = tuple(values.get(k) for k in (("n_sample_frames" if name == "train_data" else "video_length"),
                                          "height", "width"))
    return shape if any(v is not None for v in shape) else None


def field(key: str, value, out: dict, notes: list, prefix: str = "") -> None:
    """One field outside the two tables: mapped, checked against the one value that works, noted, or unknown."""
    if key in FIELDS:
        out[FIELDS[key]] = number(key, value)
    elif key in ONLY:
        allowed, why = ONLY[key]
        if value != allowed:
            raise ValueError(f"{prefix}{key}: only {allowed!r} is supported ({why}), got {value!r}")
    elif key in IGNORED:
        notes.append(f"{prefix}{key}: {IGNORED[key]}")
    else:
        raise ValueError(f"unknown key {prefix}{key} (not a field of Tune-A-Video's configs, nor one of diffusers' "
                         "report_to, lr_num_cycles, lr_power, nor apla)")


def number(key: str, value):
    """A field's value as Tune-A-Video meant it where YAML 1.1 reads it otherwise: a float with an exponent and no dot
    ("3e-5") as a number, not a string; `mixed_precision: no` as "no", not false."""
    if key == "mixed_precision" and value is False:
        return "no"
    if key in FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass  # left to the field's type check, which names it
    return value

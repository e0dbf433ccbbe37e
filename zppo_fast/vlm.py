"""Vision-language students and teachers: image questions through the processor, in rollouts and
in the training forward.

    model, processor = build_tiny_vlm(tokenizer)            # or load_vlm("path/to/Qwen3.5-0.8B")
    prompt = record_prompt(processor, record)               # plain question; record_prompt(processor,
                                                            # record, bcq_text) keeps its images
    engine = TransformersEngine(model, processor.tokenizer, processor=processor)
    groups = engine.generate([prompt.input_ids], params, images=[record.images])
    mb = image_micro_batch([prompt], [groups[0][0].token_ids], pad_id)
    hidden = VLMPolicy(model)(mb)                            # (N, H) -> fused loss with policy.lm_head

A prompt's ids hold each image as `<|vision_start|>` + k `<|image_pad|>` + `<|vision_end|>`, with k the
image's merged patch count (its `image_grid_thw` product / merge_size²); the model scatters the vision
tower's k output vectors over those placeholders. The replay buffer stores only question ids: the
images come back from the `Record` whenever its prompt is rebuilt.

Image sequences are not packed. Qwen3.5 gives image tokens 3-D rotary positions (time, row, column)
computed per sequence from its token layout (`get_rope_index`); a packed row would need those
recomputed per segment and a varlen vision path, so image micro-batches use the right-padded (B, T)
layout of `pack(..., packed=False)`, and `VLMPolicy` refuses a packed micro-batch that carries
images. Text-only micro-batches of a VLM student still go through `Policy`'s packed path.

With `parallel.share_prefix` an image group is laid out as a text group is (zppo_fast/shared_prefix.py:
its prompt once, then its G responses), and its images go through the vision tower once
(`shared_image_micro_batch`, `vlm_shared_hidden`): each prompt's 3-D positions come from
`get_rope_index` on that prompt alone, and each response continues from its prompt's last position,
where it would sit after its prompt alone (a prompt ends in text, whose three coordinates are equal).

On a CPU without torchvision, transformers cannot build Qwen-VL processors (their video processor
needs it). `ImageTextProcessor` is the same processor with images only; `build_tiny_vlm` uses it,
and `load_vlm` falls back to it when torchvision is missing.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Qwen3VLProcessor

from zppo_fast.datasets import Record
from zppo_fast.model import DTYPES, ModelLoadError, Policy, _model_folder, from_folder
from zppo_fast.packing import MicroBatch, pack, pack_shared
from zppo_fast.prompts import with_closing

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
# The config keys of those tokens' ids (Qwen2-VL .. Qwen3.5 name them alike).
VISION_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

# zppo_fast.tokenizer's ChatML, with list contents as Qwen-VL writes them: an {"type": "image"} part
# becomes one placeholder that the processor widens to the image's token count. String contents
# render exactly as the text template does, so text prompts keep their ids.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageTextProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor (used by Qwen3.5) without a video processor: images and text only.

    Qwen3VLProcessor requires a video processor, which transformers can only build with
    torchvision; rollouts and training here never see video, so this drops it.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with this signature's attributes, so the
        # None video processor is dropped rather than type-checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_processor(tokenizer: PreTrainedTokenizerBase, patch_size: int = 16, merge_size: int = 2,
                    min_pixels: int = 32 * 32, max_pixels: int = 64 * 64) -> ImageTextProcessor:
    """A Qwen2-VL-style image processor with a copy of `tokenizer` given the vision tokens.

    Images are resized to multiples of patch_size * merge_size holding min..max_pixels pixels, so
    the defaults give 1 to 4 image tokens per image (16x16 patches merged 2x2): cheap on a CPU.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = copy.deepcopy(tokenizer)  # the caller's text tokenizer keeps its vocabulary
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                               min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageTextProcessor(image_processor, tokenizer, chat_template=VLM_CHAT_TEMPLATE)


def build_tiny_vlm(tokenizer: PreTrainedTokenizerBase, seed: int = 0, hidden_size: int = 32, num_layers: int = 4,
                   dtype: str = "float32") -> tuple[PreTrainedModel, ImageTextProcessor]:
    """A tiny Qwen3_5ForConditionalGeneration and its in-process processor (no download).

    Text decoder as `model.build_tiny_model` (three Gated-DeltaNet layers per full-attention layer);
    vision tower of one block, hidden 32, 16x16 patches merged 2x2 into the decoder's width.
    Interleaved multimodal rotary embedding over 12 of each head's 16 dims: 2 frequencies each for
    time, row and column, as the real config splits its own.
    """
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5TextConfig, Qwen3_5VisionConfig

    processor = build_processor(tokenizer)
    tok = processor.tokenizer
    h = hidden_size
    pattern = ["linear_attention", "linear_attention", "linear_attention", "full_attention"]
    text = Qwen3_5TextConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=3 * h, num_hidden_layers=num_layers,
        layer_types=[pattern[i % 4] for i in range(num_layers)],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=h // 4, linear_value_head_dim=h // 4,
        max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "mrope_section": [2, 2, 2], "mrope_interleaved": True},
        dtype=dtype,
    )
    vision = Qwen3_5VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                                 spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=h,
                                 num_position_embeddings=64)  # an 8x8 learned grid, resampled per image
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           [("vision_start_token_id", VISION_START), ("vision_end_token_id", VISION_END),
            ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD)]}
    config = Qwen3_5Config(text_config=text, vision_config=vision, dtype=dtype, **ids)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen3_5ForConditionalGeneration(config)
    return model.to(DTYPES[dtype]), processor


def is_vlm(model: torch.nn.Module) -> bool:
    """Does `model` take images (a transformers config with a vision sub-config)?"""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None


def vision_token_ids(config: Mapping[str, Any], where: str) -> list[int]:
    """The ids of the vision special tokens a VLM config names (`VISION_TOKEN_KEYS`), sorted.

    They belong in prompts only: an `<|image_pad|>` in a response has no image features behind it,
    and the training forward fails on it ("Image features and image tokens do not match"), so the
    rollout engines never sample these ids. `config`: the model's config as a dict (config.json);
    one without `image_token_id` is an error naming `where`.
    """
    if config.get("image_token_id") is None:
        raise ValueError(f"{where}: the config of this vision-language model has no image_token_id, so the "
                         f"rollout engine cannot keep image placeholders out of responses")
    return sorted({int(config[k]) for k in VISION_TOKEN_KEYS if config.get(k) is not None})


def load_vlm(path: str | Path, dtype: str = "float32") -> tuple[PreTrainedModel, Any]:
    """An image-text-to-text model and its processor from a local folder (never the network)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(path)
    model = from_folder(AutoModelForImageTextToText, Path(path), "an image-text-to-text model", dtype=DTYPES[dtype])
    return model, processor


def load_processor(path: str | Path, pixels: tuple[int | None, int | None] = (None, None)) -> Any:
    """The processor (image processor + tokenizer) of a local image-text-to-text folder; `pixels`:
    (min, max) pixels per resized image (`set_image_pixels`; None: the folder's own bound)."""
    from transformers import AutoProcessor

    path = _model_folder(path)
    processor = from_folder(AutoProcessor, path, "the processor")
    if getattr(processor, "image_processor", None) is None and importlib.util.find_spec("torchvision") is None:
        # Without torchvision AutoProcessor cannot build a Qwen-VL processor (its video half) and
        # quietly returns the bare tokenizer; build the images-only one from the same files.
        try:
            processor = ImageTextProcessor.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises many types; the user needs the path and the cause
            raise ModelLoadError(f"{path} has no image processor (nor one loadable without torchvision: "
                                 f"{type(e).__name__}: {e}): not an image-text-to-text model folder") from e
    if getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(f"{path} has no image processor (AutoProcessor gave {type(processor).__name__}): "
                             "not an image-text-to-text model folder; use model.load_model for a text model")
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    set_image_pixels(processor, *pixels, where=str(path))
    return processor


def set_image_pixels(processor: Any, min_pixels: int | None, max_pixels: int | None, where: str = "") -> None:
    """Bound the pixel count of every image the processor resizes (Qwen-VL image processors keep
    the bounds in `size`: shortest_edge = min pixels, longest_edge = max pixels; the image is scaled,
    aspect ratio kept, to sides that are multiples of patch x merge size within them). None leaves
    that bound as it is; an image processor without such bounds is an error when one is given."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor, at = processor.image_processor, f"{where}: " if where else ""
    size = getattr(image_processor, "size", None)
    edges = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    current = {k: (size.get(k) if isinstance(size, dict) else getattr(size, k, None)) for k in edges}
    if None in current.values():
        raise ValueError(f"{at}the image processor {type(image_processor).__name__} has no pixel bounds "
                         f"(size = {size!r}); set data.image_min_pixels / image_max_pixels to none")
    new = {k: v if v is not None else current[k] for k, v in edges.items()}
    if not 0 < new["shortest_edge"] <= new["longest_edge"]:
        raise ValueError(f"{at}image pixel bounds must satisfy 0 < min <= max, got min {new['shortest_edge']}, "
                         f"max {new['longest_edge']} (data.image_min_pixels / image_max_pixels)")
    image_processor.size = {**size, **new} if isinstance(size, dict) else dataclasses.replace(size, **new)


# --- images -------------------------------------------------------------------------------------

def open_image(item: Any, where: str = "") -> Image.Image:
    """A PIL image (RGB) from a PIL image, a file path, or encoded bytes (as `Record.images` holds).

    Raises ValueError naming the file (or `where` for bytes) when it is not a readable image.
    """
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, Path)):
        source, name = item, f"image file {str(item)!r}"
    elif isinstance(item, (bytes, bytearray)):
        source, name = io.BytesIO(item), f"image bytes ({len(item)} bytes)"
    else:
        raise TypeError(f"{_at(where)}an image must be a PIL image, a path or bytes, not {type(item).__name__}")
    try:
        with Image.open(source) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ValueError(f"{_at(where)}{name} is not a readable image: {e}") from None


def _at(where: str) -> str:
    """A message prefix naming where an image came from, if known."""
    return f"{where}: " if where else ""


@dataclass
class EncodedImages:
    """One prompt's images as the vision tower takes them.

    pixel_values: (P, C * temporal_patch * patch * patch) flattened patches of all images, in order
    image_grid_thw: (I, 3) per image its (1, rows, columns) patch grid; P = sum of the products
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def num_image_tokens(self, merge_size: int) -> int:
        """Placeholders these images fill in the prompt: each image's patches / merge_size²."""
        return int(self.image_grid_thw.prod(-1).sum()) // merge_size**2


def encode_images(processor: Any, images: Sequence[Any], prompt_ids: Sequence[int] | None = None,
                  where: str = "") -> EncodedImages | None:
    """Run `images` through the processor's image processor; None for no images.

    With `prompt_ids`, checks that the prompt holds exactly the placeholders these images fill
    (a prompt built for other images, or by another processor, would be scattered wrongly).
    """
    if not images:
        enc = None
    else:
        out = processor.image_processor(images=[open_image(im, where) for im in images], return_tensors="pt")
        enc = EncodedImages(out["pixel_values"], out["image_grid_thw"])
    if prompt_ids is not None:
        have = sum(1 for t in prompt_ids if t == processor.image_token_id)
        need = 0 if enc is None else enc.num_image_tokens(processor.image_processor.merge_size)
        if have != need:
            raise ValueError(f"{_at(where)}the prompt has {have} image placeholder tokens but its {len(images)} image(s) "
                             f"fill {need}; build image prompts with zppo_fast.vlm.vlm_prompt")
    return enc


def check_image_engine(model: torch.nn.Module, processor: Any, n_prompts: int, n_images: int) -> None:
    """Raise ValueError unless a rollout with images can run: a VLM, its processor, one list per prompt."""
    if not is_vlm(model):
        raise ValueError(f"images given, but the engine's model {type(model).__name__} has no vision tower")
    if processor is None:
        raise ValueError("images given, but the engine has no processor: TransformersEngine(..., processor=)")
    if n_images != n_prompts:
        raise ValueError(f"{n_images} image lists for {n_prompts} prompts (give [] for a prompt without images)")


def vision_inputs(model: PreTrainedModel, input_ids: torch.Tensor, encoded: Sequence[EncodedImages | None],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Keyword arguments that add one batch's images to a forward or generate call.

    input_ids: (B, T), row b's placeholders filled by encoded[b] (None: no images); {} when no
    row has images. mm_token_type_ids (B, T) marks image tokens (1), from which Qwen3.5 lays out
    its 3-D rotary positions.
    """
    present = [e for e in encoded if e is not None]
    if not present:
        return {}
    return {
        "pixel_values": torch.cat([e.pixel_values for e in present]).to(device),  # (P, D)
        "image_grid_thw": torch.cat([e.image_grid_thw for e in present]).to(device),  # (I, 3)
        "mm_token_type_ids": (input_ids == model.config.image_token_id).int().to(device),
    }


# --- prompts ------------------------------------------------------------------------------------

@dataclass
class VLMPrompt:
    """A chat prompt with its images: ids with expanded placeholders, and the encoded images."""

    input_ids: list[int]
    images: EncodedImages | None


def vlm_prompt(processor: Any, text: str, images: Sequence[Any] = (), closing: bool = True) -> VLMPrompt:
    """One user turn (images first, then `text` with the closing instruction) opening the
    assistant turn, through the processor's chat template; as `data.chat_prompt_ids` for text."""
    content = with_closing(text) if closing else text
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": content}]
    rendered = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                             tokenize=False)
    pil = [open_image(im) for im in images]
    out = processor(text=[rendered], images=[pil] if pil else None, return_tensors="pt")
    enc = EncodedImages(out["pixel_values"], out["image_grid_thw"]) if pil else None
    return VLMPrompt(out["input_ids"][0].tolist(), enc)


def record_prompt(processor: Any, record: Record, text: str | None = None) -> VLMPrompt:
    """The prompt of `record` with its images; `text` replaces the question for a BCQ/NCQ (or hint)
    reformulation, which keeps the question's images. Errors name the record's source row."""
    try:
        return vlm_prompt(processor, record.prompt_text() if text is None else text, record.images)
    except ValueError as e:
        raise ValueError(f"record {record.id!r} ({record.source or 'no source'}): {e}") from None


# --- training forward ---------------------------------------------------------------------------

@dataclass
class ImageMicroBatch(MicroBatch):
    """A right-padded micro-batch (never packed, see the module docstring) and its sequences' images.

    pixel_values: (P, D) of every image of the batch, row by row; None when no row has images
    image_grid_thw: (I, 3) matching
    """

    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    image_counts: list[int] | None = None  # shared-prefix layout: images per prompt, in row order

    def to(self, device: torch.device) -> ImageMicroBatch:
        images = {k: None if t is None else t.to(device, non_blocking=True)
                  for k, t in (("pixel_values", self.pixel_values), ("image_grid_thw", self.image_grid_thw))}
        return ImageMicroBatch(**vars(MicroBatch.to(self, device)), **images, image_counts=self.image_counts)


def image_micro_batch(prompts: Sequence[VLMPrompt], responses: Sequence[Sequence[int]], pad_id: int,
                      rows: list[int] | None = None) -> ImageMicroBatch:
    """Prompt + response of each sequence, right-padded to (B, T), with the prompts' images."""
    if len(prompts) != len(responses):
        raise ValueError(f"image_micro_batch: {len(prompts)} prompts, {len(responses)} responses")
    mb = pack([list(p.input_ids) + list(r) for p, r in zip(prompts, responses)],
              [len(p.input_ids) for p in prompts], rows, packed=False, pad_id=pad_id)
    present = [p.images for p in prompts if p.images is not None]
    pixel_values = torch.cat([e.pixel_values for e in present]) if present else None
    grid = torch.cat([e.image_grid_thw for e in present]) if present else None
    return ImageMicroBatch(**vars(mb), pixel_values=pixel_values, image_grid_thw=grid)


def shared_image_micro_batch(groups: Sequence[tuple[VLMPrompt, Sequence[Sequence[int]]]],
                             rows: list[int] | None = None) -> ImageMicroBatch:
    """Groups [(prompt, [response ids, ...])] in the shared-prefix layout (`pack_shared`: each prompt
    once, then its responses), with each prompt's images once."""
    mb = pack_shared([(list(p.input_ids), [list(r) for r in rs]) for p, rs in groups], rows)
    present = [p.images for p, _ in groups if p.images is not None]
    return ImageMicroBatch(**vars(mb), pixel_values=torch.cat([e.pixel_values for e in present]) if present else None,
                           image_grid_thw=torch.cat([e.image_grid_thw for e in present]) if present else None,
                           image_counts=[0 if p.images is None else len(p.images.image_grid_thw) for p, _ in groups])


def shared_positions(model: PreTrainedModel, mb: ImageMicroBatch) -> torch.Tensor:
    """(3, 1, T) rotary positions (time, row, column) of a shared-prefix image row: each prompt's as
    `get_rope_index` gives them for the prompt alone, each response's continuing from its prompt's end."""
    body, ids = model.model, mb.input_ids[0]
    positions = torch.empty(3, ids.numel(), dtype=torch.long, device=ids.device)
    grids = (mb.image_grid_thw.split(mb.image_counts) if mb.image_grid_thw is not None
             else [None] * len(mb.image_counts))
    for (start, n), grid in zip(mb.shared.prompts, grids):
        prompt = ids[start : start + n][None]  # (1, n)
        if grid is not None and len(grid):
            types = (prompt == model.config.image_token_id).int()
            positions[:, start : start + n] = body.get_rope_index(prompt, types, image_grid_thw=grid)[0][:, 0]
        else:
            positions[:, start : start + n] = torch.arange(n, device=ids.device)
    for start, n, k in mb.shared.responses:
        p_start, p_len = mb.shared.prompts[k]
        last = positions[:, p_start + p_len - 1 : p_start + p_len]  # (3, 1)
        positions[:, start : start + n] = last + torch.arange(1, n + 1, device=ids.device)
    return positions[:, None]


def vlm_shared_hidden(model: PreTrainedModel, mb: ImageMicroBatch, attention: str = "sdpa") -> torch.Tensor:
    """(N, H) final hidden states predicting `mb.targets` for a shared-prefix image micro-batch
    (`shared_image_micro_batch`): the vision tower runs once per prompt's images, their outputs fill
    the prompt's placeholders, and the decoder runs the row under the shared-prefix masks."""
    body = model.model
    embeds = body.get_input_embeddings()(mb.input_ids)  # (1, T, H)
    if mb.pixel_values is not None:
        features = body.get_image_features(mb.pixel_values, mb.image_grid_thw, return_dict=True).pooler_output
        slots = (mb.input_ids == model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(slots, torch.cat(features).to(embeds.dtype))
    h = body.language_model(inputs_embeds=embeds, position_ids=shared_positions(model, mb), use_cache=False,
                            attention_mask=mb.model_kwargs(attention)["attention_mask"]).last_hidden_state
    return h.reshape(-1, h.shape[-1])[mb.hidden_index]


def vlm_hidden(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
               hidden_index: torch.Tensor) -> torch.Tensor:
    """(N, H) final hidden states of the positions `hidden_index` (flat into (B, T)) predicting
    response tokens, with images; lm_head is left to the fused loss.

    input_ids, attention_mask: (B, T) right-padded; pixel_values (P, D) and image_grid_thw (I, 3)
    fill the placeholders of the rows in order (None for a batch without images).
    """
    encoded = [] if pixel_values is None else [EncodedImages(pixel_values, image_grid_thw)]
    vision = vision_inputs(model, input_ids, encoded, input_ids.device)
    # model.model is the multimodal body (vision tower + decoder) without lm_head.
    h = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                    **vision).last_hidden_state  # (B, T, H)
    return h.reshape(-1, h.shape[-1])[hidden_index]


class VLMPolicy(Policy):
    """`Policy` for a VLM student: image micro-batches through `vlm_hidden`, text-only micro-batches
    (packed or not) through `Policy`'s decoder path. `lm_head` is the same (V, H) weight."""

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        """(N, H) hidden states of the positions that predict `mb.targets`."""
        if isinstance(mb, ImageMicroBatch) and mb.shared is not None:
            return vlm_shared_hidden(self.lm, mb, self.attention(mb))
        if isinstance(mb, ImageMicroBatch) and mb.pixel_values is not None:
            if mb.cu_seqlens is not None:
                raise ValueError("a packed micro-batch with images: image sequences use the padded layout "
                                 "(image_micro_batch), as Qwen3.5's 3-D image positions are per sequence")
            return vlm_hidden(self.lm, mb.input_ids, mb.attention_mask, mb.pixel_values, mb.image_grid_thw,
                              mb.hidden_index)
        return super().forward(mb)

"""PaLMR's shared vocabulary: prompt format, response parsing, checkpoints, sampling engines, dist helpers.

    python palmr.py tiny --out ~/.cache/palmr/tiny-qwen25vl   # build the embedded tiny checkpoint
    python palmr.py tiny --family qwen3_vl                    # another family's (FAMILIES), in ~/.cache/palmr/tiny-qwen3vl

Everything else imports this file; it imports nothing of the project. The tiny checkpoints are random
Qwen2.5-VL, Qwen3-VL and Qwen3.5 models (same classes and parameter names as the hub checkpoints, only smaller)
with a byte-level BPE tokenizer trained offline here, so that every entry point runs with no downloads; what
differs between the families is the table FAMILIES.
"""
import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# Prompt format and response parsing

INSTRUCTION = ("First think step by step about what you see inside <think> </think>, "
               "then give the final answer in \\boxed{}.")
CHOICE_LETTERS = "ABCDEFGHIJ"
# Vision-SR1 (arXiv 2508.19652; the official see-think prompt, reworded): a self-contained description of the
# image first, then the reasoning, then the answer; and the text-only pass that answers from the description
SR1_INSTRUCTION = ("First describe the image inside <description> </description>: a self-contained account of "
                   "every visual detail needed to answer the question without seeing the image. Then think step by "
                   "step inside <think> </think>, and give the final answer in \\boxed{}.")
SR1_TEXT_INSTRUCTION = ("You cannot see the image: answer from the text description alone. First think step by step "
                        "inside <think> </think>, then give the final answer in \\boxed{}.")
_SR1_FORMAT = re.compile(r"^\s*<description>(.*?)</description>\s*<think>.*?</think>\s*\\boxed\{.*\}\s*$", re.DOTALL)
_DESCRIPTION = re.compile(r"<description>(.*?)</description>", re.DOTALL)
_SR1_TAG_SPACES = re.compile(r"\s*(<|>|/)\s*")  # the official reward deletes these spaces before its format check


def format_question(question, choices=None, instruction=INSTRUCTION):
    """The user turn's text: the question, lettered choices if any, and the output-format instruction."""
    lines = [question.strip()]
    if choices:
        lines += [f"{CHOICE_LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append(instruction)
    return "\n".join(lines)


def parse_description(text):
    """Vision-SR1's reply -> (description or None, well_formed). Well formed: <description>...</description>,
    then <think>...</think>, then \\boxed{...} and nothing else (the official format reward's regex), checked
    as the official compute_score does, after deleting spaces around '<', '>' and '/' ('< /think >' counts;
    see_think_selfReward.py, "handle qwen2.5vl-32b format"). The description is the first block's text, stripped."""
    m = _DESCRIPTION.search(text)
    return (m.group(1).strip() if m else None), bool(_SR1_FORMAT.match(_SR1_TAG_SPACES.sub(r"\1", text)))


def sr1_trace(trace):
    """A `<think>...</think> ... \\boxed{a}` trace in Vision-SR1's format: its first sentence (the observation)
    as the description, the rest as the reasoning: `<description>...</description><think>...</think> \\boxed{a}`
    (palmr.parse_description's layout; arXiv 2508.19652). A one-sentence trace keeps it in both blocks."""
    think, answer, well_formed = parse_response(trace)
    assert well_formed and think, f"not a <think> ... \\boxed{{}} trace: {trace[:80]!r}"
    head, _, tail = think.strip().partition(". ")
    head, tail = (head + ".", tail) if tail else (head, head)
    return f"<description>{head}</description><think>{tail}</think> \\boxed{{{answer}}}"


def last_boxed(text):
    """Content of the last \\boxed{...} with balanced braces, or None when there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: the answer was cut off


_FORMAT = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


def parse_response(text):
    """-> (think, answer, well_formed). Well formed: one <think>...</think> first, then text with \\boxed{}."""
    m = _FORMAT.match(text)
    think = m.group(1).strip() if m else ""
    tail = m.group(2) if m else text
    boxed = last_boxed(tail if m else text)
    answer = (boxed or "").strip()
    well_formed = bool(m) and boxed is not None and "<think>" not in tail and "</think>" not in tail \
        and "<think>" not in m.group(1)
    return think, answer, well_formed



# -----------------------------------------------------------------------------
# Colour and plural vocabulary: what the checklist (PEARL), the ViCrit builder and the judge pairs share

SAME_COLOUR = {"gray": "grey"}  # spellings of one colour: never a different colour of each other
COLOUR_WORDS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "grey",
                "gray", "cyan", "magenta"}  # basic colour terms: an object has one, so another is a checkable absence


IRREGULAR_PLURALS = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
                     "goose": "geese", "foot": "feet", "tooth": "teeth", "sheep": "sheep", "fish": "fish",
                     "deer": "deer", "people": "people", "men": "men", "women": "women", "children": "children"}


def plural_noun(name):
    """English plural of a lower-case noun phrase's last word (box -> boxes, berry -> berries, person ->
    people). A word already plural by the regular rule ('glasses', 'scissors': a final s not after s, u or
    i) is left as it is; so is any word the rules get wrong, which leaves the question readable and its
    answer unaffected."""
    head, _, last = name.rpartition(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif re.search(r"[^siu]s$", last):
        pass
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


# -----------------------------------------------------------------------------
# The embedded tiny checkpoint

QWEN_SPECIAL_TOKENS = [  # Qwen2.5-VL's special tokens, in Qwen's order (ids 0.. in the tiny vocabulary)
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template, reduced to what this project renders (text and image parts). `system` writes the
# default system turn (Qwen2.5-VL's template does, Qwen3-VL's and Qwen3.5's do not); `think` opens the
# reasoning in the generation prompt, as Qwen3.5's template does by default (thinking mode).
def chat_template(system=True, think=False):
    return (
        "{% for message in messages %}"
        + ("{% if loop.first and message['role'] != 'system' %}"
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}" if system else "")
        + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n" + ("<think>\n" if think else "") + "{% endif %}")


CHAT_TEMPLATE = chat_template()

# A few lines of text in the project's domain: the tokenizer learns its merges from them (offline).
_TOKENIZER_CORPUS = [
    INSTRUCTION, "You are a helpful assistant.", "<think> </think> \\boxed{} The answer is",
    "How many shapes are there in the image? Is there a red circle? Are there more squares than circles?",
    "What colour is the triangle? Which shape is the largest? Answer yes or no.",
    "I see one red circle, two blue squares, three green triangles and a yellow star.",
    "There are 0 1 2 3 4 5 6 7 8 9 10 shapes. So the count is 4, which is more than 3. yes no",
    "A. B. C. D. E. the of and to in is that on with for left right top bottom middle",
    "The chart shows values 12.5 and 3/4; x = 2, y = -1, angle 45 degrees, \\frac{1}{2}, \\sqrt{2}.",
]


# -----------------------------------------------------------------------------
# Model families: what differs between Qwen2.5-VL, Qwen3-VL and Qwen3.5, in one table
#
# Everything else is asked of the model and processor themselves: the patch and merge size
# (processor.image_processor), the 3-D positions (model.model.get_rope_index, takes_token_types), tied
# embeddings (config.tie_word_embeddings: lm_head.weight *is* the embedding), the decoder and vision block
# classes FSDP wraps (model._no_split_modules, fsdp_blocks) and which decoder layers are attention layers
# (text_config.layer_types, shared_prefix_exact).

@dataclasses.dataclass(frozen=True)
class Family:
    """One model family this project trains. What cannot be read off a loaded model lives here: the hub names
    vLLM's loader expects, and the shape of the family's tiny random checkpoint (build_tiny_checkpoint)."""
    name: str                # as the README and messages say it
    config_class: str        # transformers config class (the tiny checkpoint is built from it)
    processor_class: str     # processor_class of the hub folders (AutoProcessor's choice where torchvision is present)
    tokenizer_class: str     # tokenizer_class of the hub folders
    vllm_prefixes: tuple     # (transformers-v5 name prefix, hub checkpoint prefix) pairs: vllm_weight_name
    tiny_dir: str            # where the embedded tiny checkpoint of this family is built
    tiny_text: dict          # the tiny text_config (beside the shared dims in build_tiny_checkpoint)
    tiny_vision: dict        # the tiny vision_config
    tiny_processor: dict     # preprocessor_config.json: the hub checkpoint's keys and values, limits shrunk
    tiny_tokens: tuple = ()  # added non-special tokens of the family's vocabulary (Qwen3: <think>, </think>)
    system_prompt: bool = True   # its chat template writes a default system turn
    think: bool = False          # its chat template opens <think> in the generation prompt (thinking mode)
    tied: bool = False           # the tiny ties the LM head to the embedding, as the family's small checkpoints do


_CLIP_NORM = dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])
_HALF_NORM = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
_COMMON_PROCESSOR = dict(do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True,
                         rescale_factor=1 / 255, temporal_patch_size=2, merge_size=2)

FAMILIES = {  # config.json model_type -> Family
    # vLLM 0.26.0 model_executor/models/qwen2_5_vl.py (hf_to_vllm_mapper) reads the hub names: the language model
    # under model.*, the vision tower under visual.*, and maps them to its modules itself (q/k/v, gate/up stacked)
    "qwen2_5_vl": Family(
        "Qwen2.5-VL", "Qwen2_5_VLConfig", "Qwen2_5_VLProcessor", "Qwen2Tokenizer",
        (("model.language_model.", "model."), ("model.visual.", "visual.")), "~/.cache/palmr/tiny-qwen25vl",
        tiny_text=dict(rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
        tiny_vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=14, window_size=112,
                         fullatt_block_indexes=[1]),
        tiny_processor=dict(image_processor_type="Qwen2VLImageProcessor", min_pixels=56 * 56, max_pixels=448 * 448,
                            patch_size=14, **_CLIP_NORM)),
    # Qwen3-VL's hub folders already hold transformers-v5 names (model.language_model.*, model.visual.*, lm_head.*),
    # which vLLM 0.26.0 qwen3_vl.py maps itself (hf_to_vllm_mapper); with tied embeddings it skips lm_head
    "qwen3_vl": Family(
        "Qwen3-VL", "Qwen3VLConfig", "Qwen3VLProcessor", "Qwen2Tokenizer", (), "~/.cache/palmr/tiny-qwen3vl",
        tiny_text=dict(head_dim=32, rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6],
                                                     "mrope_interleaved": True, "rope_theta": 5000000.0}),
        tiny_vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                         num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        tiny_processor=dict(image_processor_type="Qwen2VLImageProcessorFast", patch_size=16,
                            size={"shortest_edge": 64 * 64, "longest_edge": 512 * 512}, **_HALF_NORM),
        tiny_tokens=("<think>", "</think>"), system_prompt=False, tied=True),
    # Qwen3.5: natively multimodal, 3 Gated DeltaNet (linear attention) layers per full-attention layer; hub
    # names as Qwen3-VL's (vLLM 0.26.0 qwen3_5.py stacks in_proj_qkv/in_proj_z and in_proj_b/in_proj_a itself)
    "qwen3_5": Family(
        "Qwen3.5", "Qwen3_5Config", "Qwen3VLProcessor", "Qwen2Tokenizer", (), "~/.cache/palmr/tiny-qwen35",
        tiny_text=dict(head_dim=32, full_attention_interval=4, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=32, linear_value_head_dim=32,
                       rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                        "rope_theta": 10000000.0, "partial_rotary_factor": 0.5}),
        tiny_vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                         num_position_embeddings=64),
        tiny_processor=dict(image_processor_type="Qwen2VLImageProcessorFast", patch_size=16,
                            size={"shortest_edge": 64 * 64, "longest_edge": 512 * 512}, **_HALF_NORM),
        tiny_tokens=("<think>", "</think>"), system_prompt=False, think=True, tied=True),
}
SUPPORTED_MODEL_TYPES = {k: f.name for k, f in FAMILIES.items()}  # config.json model_type -> family name
TINY = {k: f.tiny_dir for k, f in FAMILIES.items()}


def tiny_family(path):
    """The family whose embedded tiny checkpoint `path` names (TINY; built when missing), or None."""
    where = os.path.abspath(os.path.expanduser(str(path)))
    return next((k for k, d in TINY.items() if os.path.abspath(os.path.expanduser(d)) == where), None)


def template_prefill(path):
    """What the chat template of checkpoint `path` writes of the assistant turn before the model does
    (generation_prefill: '<think>\n' for Qwen3.5's, '' for Qwen2.5-VL's and Qwen3-VL's). Reads the tokenizer and
    template only; an embedded tiny checkpoint not built yet answers from its family's template."""
    family = tiny_family(path)
    if family and not (Path(path).expanduser() / "config.json").exists():
        return "<think>\n" if FAMILIES[family].think else ""
    return generation_prefill(render_prompt(load_processor(str(Path(path).expanduser())), ""))


def takes_token_types(model):
    """True where the model's own get_rope_index reads mm_token_type_ids to place the image tokens' 3-D mRoPE
    positions (transformers 5.2x, every family: without them a Qwen2.5-VL forward silently gives image tokens
    1-D text positions, a Qwen3-VL one raises). Older versions find the image tokens in input_ids themselves."""
    return "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters


def model_inputs(model, batch):
    """batch without mm_token_type_ids where the model's get_rope_index does not take them (takes_token_types)."""
    return batch if takes_token_types(model) else {k: v for k, v in batch.items() if k != "mm_token_type_ids"}


def shared_prefix_exact(config):
    """None when the shared-prefix forward is exact for this model (every decoder layer is softmax attention,
    whose keys a completion may share), else why not: a linear-attention (recurrent) layer carries one state
    along the sequence, so a second completion would read the first's (Qwen3.5's Gated DeltaNet layers)."""
    text = getattr(config, "text_config", config)
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    return None if kinds <= {"full_attention"} else (
        f"{', '.join(sorted(kinds - {'full_attention'}))} layers carry a recurrent state along the sequence")


def shared_prefix_allowed(path):
    """True when the shared-prefix layout is exact for checkpoint `path` (shared_prefix_exact); else False, with one
    line saying why, from rank 0 (the trainer then uses the per-row layout)."""
    why = shared_prefix_exact(load_config(path))
    if why:
        print0(f"shared prefix: off for this model ({why}): the per-row layout")
    return why is None


def fsdp_blocks(model):
    """The modules FSDP2 shards one by one: the decoder layers and vision blocks, found by the classes the model
    itself names as never to be split (`_no_split_modules`), in model order."""
    names = set(model._no_split_modules or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def build_tiny_checkpoint(out_dir, seed=0, vocab_size=1024, family="qwen2_5_vl"):
    """Write a tiny random checkpoint of `family` (FAMILIES: model, tokenizer, processor configs); -> its path.

    The folder has the layout of the family's hub checkpoints (Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-2B-Instruct,
    Qwen/Qwen3.5-2B): their processor_class and image_processor_type, patch and merge size, special tokens, chat
    template (system turn, thinking prefill), tied embeddings where the small checkpoints tie them; built from the
    installed transformers' own config and model classes, so AutoModelForImageTextToText and `from_pretrained` load
    it. `load_processor` falls back to the PIL image processor where torchvision is missing. Raises KeyError for an
    unknown family.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast
    spec = FAMILIES[family]
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # Tokenizer: byte-level BPE (as Qwen's), trained on the corpus above, Qwen special tokens first.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 16, special_tokens=QWEN_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:], model_max_length=32768)
    if spec.tiny_tokens:  # added, not special: decoding keeps them, as Qwen3's <think> (151667) and </think>
        tokenizer.add_tokens(list(spec.tiny_tokens))
    template = chat_template(spec.system_prompt, spec.think)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class=spec.tokenizer_class, processor_class=spec.processor_class)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    tid = tokenizer.convert_tokens_to_ids

    # Processor configs as in the official repo (PIL processing reads the same keys).
    preprocessor = dict(image_processor_type=spec.tiny_processor["image_processor_type"],
                        processor_class=spec.processor_class, **_COMMON_PROCESSOR,
                        **{k: v for k, v in spec.tiny_processor.items() if k != "image_processor_type"})
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))

    # Model: the family's classes with every dimension shrunk; mrope_section sums to the rotary dim / 2.
    config = getattr(transformers, spec.config_class)(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
            bos_token_id=tid("<|endoftext|>"), eos_token_id=tid("<|im_end|>"),
            pad_token_id=tid("<|endoftext|>"), tie_word_embeddings=spec.tied, **spec.tiny_text),
        vision_config=dict(out_hidden_size=128, spatial_merge_size=2, temporal_patch_size=2, **spec.tiny_vision),
        image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=spec.tied)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.eos_token_id = [tid("<|im_end|>"), tid("<|endoftext|>")]
    model.generation_config.pad_token_id = tid("<|endoftext|>")
    save_here(model, out)
    return str(out)


def save_here(model, out):
    """model.save_pretrained(out) from this process, whatever its rank. transformers 5.2x writes only on global rank 0
    once torch.distributed is initialised (distributed/mixin.py, should_save_on_this_rank), so a cache that another
    node's local rank 0 builds (builds_cache) would get configs without weights, silently."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process  # this instance only
    model.save_pretrained(out)


DEFAULT_TINY = TINY["qwen2_5_vl"]


def builds_cache():
    """True on the process that builds the caches (tiny checkpoint, shapes data, warm start) that the others wait
    for: local rank 0 of every node, so each node fills its own disk (the default); global rank 0 alone when the
    user sets PALMR_SHARED_CACHE=1, saying the cache folder (~/.cache/palmr) is one shared file system."""
    if os.environ.get("PALMR_SHARED_CACHE") == "1":
        return get_rank() == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def local_world_size():
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 for plain python)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def ensure_tiny_checkpoint(path=DEFAULT_TINY, seed=0):
    """Build the tiny checkpoint of the family `path` names (TINY) once (builds_cache: one process per node, or
    one in all; the others wait); -> its path. A path that is not one of TINY builds a tiny Qwen2.5-VL there."""
    path = Path(path).expanduser()
    if builds_cache() and not (path / "config.json").exists():
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        build_tiny_checkpoint(tmp, seed=seed, family=tiny_family(path) or "qwen2_5_vl")
        os.replace(tmp, path) if not path.exists() else None
    barrier()  # every rank, always: a rank that found the folder already built must not skip it
    return str(path)


# -----------------------------------------------------------------------------
# Loading a policy checkpoint and its processor

def check_model(path):
    """Why `path` cannot be trained here, or None: no such folder, no readable config.json, or a model type outside
    SUPPORTED_MODEL_TYPES (a text-only model, another VLM family). Cheap: reads the config, loads no weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return ("no such folder" + (" (models are not downloaded: pass a local Hugging Face folder)"
                                    if "/" in str(path) and not str(path).startswith((".", "/", "~")) else ""))
    try:
        config = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        return f"no config.json in it (found: {', '.join(sorted(p.name for p in folder.iterdir())[:6]) or 'nothing'})"
    except ValueError as e:
        return f"config.json is not JSON ({e})"
    kind = config.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        text_only = "vision_config" not in config
        return (f"model_type {kind!r}" + (" (a text-only model)" if text_only else "") + "; supported: "
                + ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items()))
    return None


class LiteProcessor:
    """What this project needs of a processor (tokenizer, image processor, chat template), without torchvision."""

    def __init__(self, tokenizer, image_processor, chat_template):
        self.tokenizer, self.image_processor, self.chat_template = tokenizer, image_processor, chat_template

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=tokenize)


def load_processor(path):
    """AutoProcessor where it loads (torchvision present); else the tokenizer + PIL Qwen2-VL image processor."""
    from transformers import AutoProcessor, AutoTokenizer
    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, TypeError, ValueError, OSError, AttributeError):
        pass  # transformers needs torchvision for the fast image and the video processors
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tokenizer = AutoTokenizer.from_pretrained(path)
    template = tokenizer.chat_template
    tpl_file = Path(path) / "chat_template.json"
    if tpl_file.exists():
        template = json.loads(tpl_file.read_text())["chat_template"]
    elif (Path(path) / "chat_template.jinja").exists():
        template = (Path(path) / "chat_template.jinja").read_text()
    return LiteProcessor(tokenizer, Qwen2VLImageProcessorPil.from_pretrained(path), template)


PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json", "chat_template.json", "chat_template.jinja")


def copy_processor_files(src, dst):
    """Tokenizer, processor configs and chat template travel with the weights. An allowlist: copying the
    source's model.safetensors.index.json would point loaders (vLLM) at weight shards that do not exist."""
    for name in PROCESSOR_FILES:
        if (Path(src) / name).is_file() and not (Path(dst) / name).exists():
            shutil.copy(Path(src) / name, Path(dst) / name)


def load_config(path):
    """The checkpoint's transformers config (AutoConfig: reads config.json, loads no weights)."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def load_model(path, dtype=torch.float32, device="cpu"):
    """The policy as its transformers class (same class in trainer, evaluation and vLLM)."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)


# -----------------------------------------------------------------------------
# Images: one loader for every path (ingest, rollout, training batches, eval, filter, facts)

MIN_SIDE = 28              # Qwen2.5-VL: 14 px patches merged 2 x 2; a shorter side is brought up to this
MAX_ASPECT = 200           # transformers' qwen2_vl smart_resize raises beyond this long/short ratio
MAX_IMAGE_PIXELS = 89_478_485  # decompression-bomb guard (PIL's warning threshold), checked before decoding


def load_image(source, base=None, max_pixels=None):
    """Any image the datasets hold -> an RGB PIL image the Qwen2.5-VL processor accepts.

    source: a path (relative to `base`), raw bytes, or a Hugging Face {bytes, path} struct. Rules, in order:
    refuse more than MAX_IMAGE_PIXELS before decoding; apply the EXIF orientation; composite transparency
    (RGBA, LA, palette with a transparent index) on white; 16-bit and float greyscale scaled to 8 bits;
    CMYK, palette, greyscale and the rest converted to RGB; then `fit_pixels` (aspect ratio, minimum side,
    pixel budget). Raises ValueError with the cause (the caller adds the item's id)."""
    from PIL import Image, ImageOps
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if source is None or (isinstance(source, str) and not source.strip()):
        raise ValueError("no image")
    import warnings
    try:
        with warnings.catch_warnings():  # PIL only warns below 2x its limit; the guard below refuses instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if isinstance(source, (bytes, bytearray, memoryview)):
                import io
                im = Image.open(io.BytesIO(bytes(source)))
            else:
                path = Path(source) if base is None or os.path.isabs(str(source)) else Path(base) / str(source)
                im = Image.open(path)
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"{w} x {h} px is over the {MAX_IMAGE_PIXELS:,}-pixel decompression-bomb guard")
        im.load()
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # unreadable, truncated, not an image
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from None
    return fit_pixels(to_rgb(im), max_pixels)


def to_rgb(im):
    """8-bit RGB: transparency composited on white, 16-bit / float greyscale rescaled, not clipped."""
    from PIL import Image
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        import numpy as np
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and a.max() > 255) else 255.0
        if im.mode == "F" and a.max() <= 1.0:
            top = 1.0
        im = Image.fromarray((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im.convert("RGB")


def checkpoint_max_len(path):
    """The longest sequence a checkpoint supports (config.json: text_config.max_position_embeddings, or the
    top-level one); None when the config does not say."""
    config = json.loads((Path(path) / "config.json").read_text())
    return (config.get("text_config") or {}).get("max_position_embeddings") or config.get("max_position_embeddings")


def fit_pixels(image, max_pixels=None):
    """The geometry the processor accepts: long/short ratio padded (white, centred) down to MAX_ASPECT,
    a tiny image upscaled and a thin one padded to MIN_SIDE px on its short side, then resized (never
    cropped) to width * height <= max_pixels, keeping the aspect ratio and never below MIN_SIDE (so a
    strip may exceed the budget). Idempotent; every image goes through it before the processor."""
    from PIL import Image
    image = image if image.mode == "RGB" else to_rgb(image)
    w, h = image.size
    if max(w, h) / min(w, h) > MAX_ASPECT:  # pad rather than drop: the content stays, only margins are added
        W, H = (w, math.ceil(w / MAX_ASPECT)) if w > h else (math.ceil(h / MAX_ASPECT), h)
        canvas = Image.new("RGB", (W, H), (255, 255, 255))
        canvas.paste(image, ((W - w) // 2, (H - h) // 2))
        image, (w, h) = canvas, (W, H)
    if max(w, h) < MIN_SIDE:  # a tiny image (an icon): upscaled
        s = MIN_SIDE / min(w, h)
        w, h = max(MIN_SIDE, round(w * s)), max(MIN_SIDE, round(h * s))
        image = image.resize((w, h), Image.BICUBIC)
    elif min(w, h) < MIN_SIDE:  # a thin strip: its short side padded, the content keeps its scale
        canvas = Image.new("RGB", (max(w, MIN_SIDE), max(h, MIN_SIDE)), (255, 255, 255))
        canvas.paste(image, ((canvas.width - w) // 2, (canvas.height - h) // 2))
        image, (w, h) = canvas, canvas.size
    if max_pixels and w * h > max_pixels:
        s = math.sqrt(max_pixels / (w * h))
        image = image.resize((max(MIN_SIDE, int(w * s)), max(MIN_SIDE, int(h * s))), Image.BICUBIC)
    return image


def render_prompt(processor, question, choices=None, image=True, instruction=INSTRUCTION):
    """Chat-template text of one user turn (image first, then the question) ready for generation;
    image=False renders a text-only question (HallusionBench asks some without an image)."""
    content = ([{"type": "image"}] if image else []) + \
        [{"type": "text", "text": format_question(question, choices, instruction)}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)


def generation_prefill(prompt_text):
    """What the chat template already wrote of the assistant turn: the text after the last
    '<|im_start|>assistant' line of a rendered prompt (e.g. '<think>\n' for templates that open the
    reasoning themselves, as Qwen3-Thinking's does); '' for Qwen2.5-VL's own template."""
    head, sep, tail = prompt_text.rpartition("<|im_start|>assistant")
    return tail.split("\n", 1)[1] if sep and "\n" in tail else ""


def assistant_turn(prompt_text, completion_text):
    """The assistant turn as a whole: the template's prefilled tail + the sampled completion. S_fmt, the
    answer and the judge read this, so a prefilled '<think>' counts as written."""
    return generation_prefill(prompt_text) + completion_text


def encode_prompt(processor, text, image, max_pixels):
    """-> {input_ids: list[int], mm_token_type_ids: list[int] (1 on image tokens, else 0, as the official
    processor returns it), pixel_values: (P, C*T*ps*ps), image_grid_thw: (1, 3)} for one prompt; only
    input_ids for a text-only prompt (image None, no placeholder in the text)."""
    if image is None:
        assert "<|image_pad|>" not in text, "a text-only prompt holds no image placeholder"
        return {"input_ids": processor.tokenizer(text, add_special_tokens=False)["input_ids"]}
    vision = processor.image_processor(images=[fit_pixels(image, max_pixels)], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"].prod()) // processor.image_processor.merge_size ** 2
    assert text.count("<|image_pad|>") == 1, "a prompt holds exactly one image placeholder"
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": ids, "mm_token_type_ids": [int(t == image_id) for t in ids],
            "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}


def stop_token_ids(tokenizer):
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")})


# Never sampled: a vision placeholder inside a completion breaks the image-token/feature match and the
# mRoPE positions of the next forward. A trained policy gives them ~0 probability anyway.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def suppressed_token_ids(tokenizer, vocab_size=None):
    """Ids never sampled: the vision placeholders, and the LM head's padding rows beyond the tokenizer
    (`len(tokenizer)` .. `vocab_size`: Qwen2.5-VL-7B has 152,064 rows for 151,665 tokens), which decode to
    nothing and which the trainer does not score either (`scored_vocab`)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    return sorted(ids | set(range(len(tokenizer), vocab_size or 0)))


def config_vocab_size(config):
    """Rows of the LM head from a config (object or config.json dict): text_config.vocab_size, else vocab_size."""
    get = (lambda c, k: c.get(k)) if isinstance(config, dict) else (lambda c, k: getattr(c, k, None))
    text = get(config, "text_config")
    return (get(text, "vocab_size") if text is not None else None) or get(config, "vocab_size")


# -----------------------------------------------------------------------------
# Sampling engines: one interface (HF generate now; vLLM behind the same calls)

@dataclasses.dataclass
class Prompt:
    text: str             # rendered with the chat template, one <|image_pad|> placeholder
    image: object         # PIL image
    encoded: dict = None  # encode_prompt's output, when the caller has it already (HF engine)


@dataclasses.dataclass
class Completion:
    token_ids: list   # sampled ids, the stop token included when finished
    text: str         # decoded without special tokens
    logprobs: list    # the sampler's own log-probs of token_ids (after temperature / top-p)
    finished: bool    # stopped on a stop token rather than on max_new_tokens


class HFEngine:
    """Sampling with transformers `generate` on the training module itself (CPU default, small runs).

    Under FSDP2 the caller must `register_fsdp_forward_method(model, "generate")`; every rank then
    calls `generate` the same number of times (`synced_gpus` keeps their forward passes in step).
    """

    def __init__(self, model, processor, max_pixels):
        self.model, self.processor, self.max_pixels = model, processor, max_pixels
        self.stop_ids = stop_token_ids(processor.tokenizer)
        self.pad_id = processor.tokenizer.pad_token_id
        self.suppress = suppressed_token_ids(processor.tokenizer, config_vocab_size(model.config))

    def load_weights(self, named_tensors):
        """No-op: the engine samples from the module the trainer updates."""

    def sleep(self):
        pass

    def wake(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        """-> list (one per prompt) of n Completions."""
        enc = [p.encoded or encode_prompt(self.processor, p.text, p.image, self.max_pixels) for p in prompts]
        rows = [e for e in enc for _ in range(n)]
        batch = collate_prompts(rows, self.pad_id, device=next(self.model.parameters()).device)
        torch.manual_seed(seed)
        greedy = temperature <= 0
        was_training = self.model.training
        self.model.eval()
        out = self.model.generate(
            **model_inputs(self.model, batch), max_new_tokens=max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else temperature, top_p=None if greedy else top_p, top_k=None,
            repetition_penalty=1.0,  # Qwen's generation_config sets 1.05, which the trainer's log-probs do not model
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, suppress_tokens=self.suppress, output_scores=True,
            return_dict_in_generate=True, synced_gpus=dist.is_initialized() and dist.get_world_size() > 1)
        self.model.train(was_training)
        new = out.sequences[:, batch["input_ids"].shape[1]:].cpu()  # (B, T)
        # scores are the processed logits the sampler drew from (temperature and top-p applied)
        logprobs = torch.stack([torch.log_softmax(s.float(), -1).gather(1, new[:, i:i + 1].to(s.device)).cpu()
                                for i, s in enumerate(out.scores)], 1)[..., 0] if out.scores else new.float()
        results = []
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            stop = next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
            keep = len(ids) if stop is None else stop + 1
            ids = ids[:keep]
            text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
            results.append(Completion(ids, text, logprobs[row, :keep].tolist(), stop is not None))
        return [results[i * n:(i + 1) * n] for i in range(len(prompts))]


# -----------------------------------------------------------------------------
# The vLLM engine: one colocated vllm.LLM per rank (GPU only)

def vllm_weight_name(name, model_type="qwen2_5_vl"):
    """transformers-v5 parameter name -> the hub checkpoint name that vLLM's loader of `model_type` expects
    (FAMILIES[model_type].vllm_prefixes), i.e. the names `save_pretrained` writes; vLLM maps those to its own
    modules and stacks q/k/v, gate/up (and Qwen3.5's linear-attention projections) itself.

    Qwen2.5-VL (vLLM 0.26.0 model_executor/models/qwen2_5_vl.py, hf_to_vllm_mapper): model.language_model.* ->
    model.*, model.visual.* -> visual.*, lm_head.* unchanged. Qwen3-VL (qwen3_vl.py) and Qwen3.5 (qwen3_5.py):
    unchanged, their hub folders hold these names already. A tied LM head never reaches this function: tied
    parameters appear once in named_parameters(), as the embedding, which vLLM's tied head shares.
    """
    for old, new in FAMILIES[model_type].vllm_prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def vllm_sampling_kwargs(n, max_new_tokens, temperature, top_p, seed, stop_ids, suppress_ids):
    """Our sampling settings as vllm.SamplingParams keyword arguments (vLLM 0.26.0 sampling_params.py)."""
    greedy = temperature <= 0
    return dict(n=n, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p, top_k=0,  # 0: no top-k
                seed=seed, logprobs=0,  # 0: the sampled token's log-prob only
                stop_token_ids=list(stop_ids), logit_bias={t: -100.0 for t in suppress_ids},
                skip_special_tokens=True)


def completion_from_vllm(output):
    """A vLLM CompletionOutput (token_ids, text, logprobs: per position {id: Logprob}, finish_reason)."""
    ids = list(output.token_ids)
    logprobs = [position[t].logprob for position, t in zip(output.logprobs or [], ids)]
    assert len(logprobs) == len(ids), "vLLM returned no log-probs: SamplingParams(logprobs=0) is required"
    return Completion(ids, output.text, logprobs, output.finish_reason == "stop")


def select_engine(requested, cuda_available, vllm_available):
    """'auto' -> vllm on GPUs when vLLM is installed, else hf; an impossible request is an error."""
    if requested == "auto":
        return "vllm" if cuda_available and vllm_available else "hf"
    if requested == "vllm" and not cuda_available:
        raise ValueError("--engine vllm needs CUDA GPUs; use --engine hf on CPU")
    if requested == "vllm" and not vllm_available:
        raise ValueError("--engine vllm: vllm is not installed (pip install -r requirements-vllm.txt)")
    if requested not in ("hf", "vllm"):
        raise ValueError(f"unknown engine {requested!r}")
    return requested


def engine_lengths(max_prompt_tokens, max_new_tokens, checkpoint_limit, override=None):
    """-> (max_model_len, max_prompt_tokens, warning or ''): the sampler's context never above what the
    checkpoint supports (vLLM refuses to start otherwise: the tiny checkpoint's 4096 < 4096 + 64); the
    prompt budget shrinks to fit it, so longer prompts are filtered at load, never truncated.
    `override` (--vllm-max-model-len) is used as given."""
    want = override or max_prompt_tokens + max_new_tokens
    if override is None and checkpoint_limit and want > checkpoint_limit:
        length = checkpoint_limit
        warning = (f"max_model_len {want} (prompt {max_prompt_tokens} + new {max_new_tokens}) is above the checkpoint's "
                   f"max_position_embeddings {checkpoint_limit}: using {length}")
    else:
        length, warning = want, ""
    assert length > max_new_tokens, f"max_model_len {length} leaves no room for a prompt before {max_new_tokens} new tokens"
    prompt = min(max_prompt_tokens, length - max_new_tokens)
    if prompt < max_prompt_tokens:
        warning += ("; " if warning else "") + f"prompts over {prompt} tokens are dropped at load"
    return length, prompt, warning


class VLLMEngine:
    """Sampling with one colocated `vllm.LLM` per rank, written against vLLM 0.26.0's API.

    external_launcher: every torchrun rank runs its own engine in-process (needs
    VLLM_ENABLE_V1_MULTIPROCESSING=0); with tensor_parallel_size k, each group of k consecutive ranks
    forms one engine and must send it the same prompts. Between rollouts the engine sleeps at level 1
    (weights to CPU, KV cache dropped; level 2 corrupts VLM buffers). Sampler log-probs are vLLM's
    processed log-probs (after temperature / top-p, the distribution sampled from). The multimodal
    processor cache is off (mm_processor_cache_gb=0); prefix, multimodal and encoder caches are reset
    after each sync (stale image embeddings otherwise survive a vision-tower update). vLLM checks that
    gpu_memory_utilization x total memory is free when it starts: it is built after the FSDP policy.
    STATUS: the CPU-testable parts (names, sampling kwargs, output translation, selection) are tested. On one H200
    (2026-12-04, vLLM 0.26.0) it ran the tiny Qwen2.5-VL default job, 3 steps + --resume (docs/gpu_h200_checks.txt);
    not run: several ranks, tensor parallelism, Qwen3-VL and Qwen3.5.
    """

    def __init__(self, model_path, processor, max_pixels, seed, tensor_parallel_size=1,
                 gpu_memory_utilization=0.3, max_model_len=None, dtype="bfloat16"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine lives in this process
        from vllm import LLM
        self.processor, self.max_pixels = processor, max_pixels
        self.stop_ids = stop_token_ids(processor.tokenizer)
        config = json.loads((Path(model_path) / "config.json").read_text())
        self.model_type = config["model_type"]  # the family's weight names (vllm_weight_name)
        self.suppress = suppressed_token_ids(processor.tokenizer, config_vocab_size(config))
        limit = checkpoint_max_len(model_path)
        max_model_len = max_model_len or min(8192, limit or 8192)  # never above what the checkpoint supports
        self.llm = LLM(model=str(model_path), distributed_executor_backend="external_launcher",
                       tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                       max_model_len=max_model_len, dtype=dtype, seed=seed, enable_sleep_mode=True,
                       enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                       limit_mm_per_prompt={"image": 1}, mm_processor_cache_gb=0)
        self.asleep = set()  # memory tags still offloaded: "weights", "kv_cache"

    def generate(self, prompts, n, max_new_tokens, temperature=1.0, top_p=1.0, seed=0):
        from vllm import SamplingParams
        requests, params = [], []
        for i, p in enumerate(prompts):  # one image placeholder in the ids: vLLM expands it itself
            ids = self.processor.tokenizer(p.text, add_special_tokens=False)["input_ids"]
            request = {"prompt_token_ids": ids}
            if p.image is not None:  # text-only prompts (image None) carry no multimodal data
                request["multi_modal_data"] = {"image": fit_pixels(p.image, self.max_pixels)}
            requests.append(request)
            params.append(SamplingParams(**vllm_sampling_kwargs(n, max_new_tokens, temperature, top_p, seed + i,
                                                                self.stop_ids, self.suppress)))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [[completion_from_vllm(o) for o in out.outputs] for out in outputs]

    def load_weights(self, named_tensors):
        """Stream (name, tensor) pairs one at a time into vLLM's model; then drop cached prefixes."""
        if "weights" in self.asleep:  # partial wake: weights back on the GPU, KV cache still released
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")

        def load(model):
            for name, tensor in named_tensors:
                model.load_weights([(vllm_weight_name(name, self.model_type), tensor)])
        self.llm.apply_model(load)  # in-process executor: runs on this rank's worker, no serialisation
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.llm.reset_mm_cache()
        self.llm.llm_engine.reset_encoder_cache()  # and so were cached image embeddings (vision tower)

    def sleep(self):
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = {"weights", "kv_cache"}

    def wake(self):
        if self.asleep:
            self.llm.wake_up(tags=sorted(self.asleep))
            self.asleep = set()


def make_engine(requested, policy, processor, model_path, max_pixels, device, seed=0, tp=1, gpu_memory=0.3,
                max_prompt_tokens=4096, max_new_tokens=64, max_model_len=None):
    """The sampler of a training run: HFEngine on the policy module itself, or a colocated VLLMEngine per rank
    (select_engine; on GPUs when vLLM is installed). Ranks rank // tp share an engine (and a seed), and pool their
    prompts through engine.tp_group. -> (engine, the prompt-token limit it can serve: engine_lengths)."""
    import importlib.util
    name = select_engine(requested, device.type == "cuda", importlib.util.find_spec("vllm") is not None)
    if name == "hf":
        return HFEngine(policy, processor, max_pixels), max_prompt_tokens
    rank = get_rank()
    assert local_world_size() % tp == 0, f"--vllm-tp {tp} must divide the {local_world_size()} ranks of a node"
    max_model_len, max_prompt_tokens, warning = engine_lengths(max_prompt_tokens, max_new_tokens,
                                                               checkpoint_max_len(model_path), max_model_len)
    if warning:
        print0(f"vllm: {warning}")
    engine = VLLMEngine(model_path, processor, max_pixels, seed=seed + rank // tp, tensor_parallel_size=tp,
                        gpu_memory_utilization=gpu_memory, max_model_len=max_model_len)
    engine.tp_group = dist.new_subgroups(group_size=tp)[0] if tp > 1 else None
    return engine, max_prompt_tokens


def collate_prompts(rows, pad_id, device="cpu"):
    """Left-pad encoded prompts into one batch: input_ids, attention_mask (B, P), pixel_values, image_grid_thw,
    and mm_token_type_ids (B, P) (1 on image tokens; model_inputs drops them for a model that does not read them)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r["input_ids"]):] = torch.tensor(r["input_ids"])
        mask[i, width - len(r["input_ids"]):] = 1
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    vision = [r for r in rows if "pixel_values" in r]  # text-only prompts carry no image
    if vision:
        batch["pixel_values"] = torch.cat([r["pixel_values"] for r in vision]).to(device)
        batch["image_grid_thw"] = torch.cat([r["image_grid_thw"] for r in vision]).to(device)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if "mm_token_type_ids" in r:
                types[i, width - len(r["input_ids"]):] = torch.tensor(r["mm_token_type_ids"])
        batch["mm_token_type_ids"] = types.to(device)
    return batch


# -----------------------------------------------------------------------------
# Distributed helpers: stock torchrun environment, one process per device


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """-h keeps the docstring's layout and shows each flag's default (not where the default is None, or where the
    help already says what an unset flag does)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def cpu_threads(threads=0):
    """CPU threads for this process: `threads`, else OMP_NUM_THREADS, else the machine's cores over its local
    ranks (torch's own default gives every rank all cores, so two ranks oversubscribe a shared machine)."""
    if threads > 0:
        return threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # taskset, SLURM
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def stop_with_launcher():
    """Under torchrun: exit when the launcher dies (a `kill -9` on it would leave the ranks running and writing
    the run folder). A daemon thread polls the parent pid; SIGTERM becomes SystemExit so exit handlers run
    (the run folder's lock is released), and a rank stuck in a collective is ended 10 s later."""
    import signal
    import threading
    if "LOCAL_RANK" not in os.environ:
        return
    parent = os.getppid()

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        print(f"[rank {os.environ.get('RANK', '?')}] the launcher (pid {parent}) is gone: stopping", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)
        os._exit(1)
    signal.signal(signal.SIGTERM, on_term)
    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


def init_dist(threads=0):
    """-> (rank, world_size, device). NCCL on GPUs, gloo on CPU; plain `python` runs as a world of one (on CPU
    without a process group; on a GPU with one, as `torchrun --nproc_per_node 1` would).
    threads: CPU threads per process (cpu_threads). Under torchrun the ranks stop when the launcher dies."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no per-shard bars when loading and saving checkpoints
    torch.set_num_threads(cpu_threads(threads))
    stop_with_launcher()
    if "RANK" not in os.environ and torch.cuda.is_available():  # plain `python` on a GPU: torchrun's world of one
        import socket  # (vLLM's in-process engine, external_launcher, reads the launcher's variables: GPU-seen bug)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=port)
    if "RANK" in os.environ and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        # CPU tensors (rewards, token counts, metrics) travel over gloo, CUDA tensors over NCCL; the
        # timeout covers the slowest legitimate wait (a rank still judging, rank 0 writing a checkpoint)
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                device_id=torch.device("cuda", local_rank) if torch.cuda.is_available() else None,
                                timeout=datetime.timedelta(minutes=int(os.environ.get("PALMR_DIST_TIMEOUT_MIN", "60"))))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    return get_rank(), get_world_size(), device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def rank0_or_stop(fn, *args):
    """fn(*args) on rank 0 only -> its result there, None elsewhere. A SystemExit on rank 0 stops every rank with
    one line: rank 0 prints it, the others exit quietly (a refusal read once, not once per rank)."""
    result, ok = None, 1
    if get_rank() == 0:
        try:
            result = fn(*args)
        except SystemExit as e:
            print(e, file=sys.stderr, flush=True)
            ok = 0
    if not int(all_reduce(torch.tensor(ok), dist.ReduceOp.MIN)):
        raise SystemExit(1)
    return result


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce(x, op=dist.ReduceOp.SUM):
    """In-place all-reduce of a tensor over the ranks (identity when not distributed); -> x."""
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x


def all_gather(x):
    """[x of every rank] (the same shape on every rank); [x] when not distributed."""
    if not dist.is_initialized():
        return [x]
    out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return out


def full_parameters(model):
    """(name, full tensor) one at a time: under FSDP2 each full_tensor() is an all-gather on every rank."""
    for name, p in model.named_parameters():
        yield name, (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def rng_states():
    """Every rank's RNG states (torch, python, numpy, cuda), gathered: a list indexed by rank, on every rank."""
    import random

    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    states = [None] * get_world_size()
    dist.all_gather_object(states, state) if dist.is_initialized() else states.__setitem__(0, state)
    return states


def restore_rng(states):
    """This rank's RNG states from rng_states()'s list -> True; False (nothing restored) when the list is of another
    number of ranks (a resume on another world size)."""
    import random

    import numpy as np
    if len(states) != get_world_size():
        return False
    state = states[get_rank()]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def save_streamed(model, out, shard_bytes=5 * 2 ** 30):
    """The Hugging Face folder of a (possibly FSDP2-sharded) model, one parameter gathered at a time. Every rank calls
    it (each full_tensor() is an all-gather); rank 0 writes each safetensors shard of at most `shard_bytes` as soon as
    it fills, under the hub names (vllm_weight_name: what save_pretrained writes, tied heads once), then renames them
    to the hub's pattern, writes the index (when there are several) and the configs. No rank holds more than one
    shard of the full model in memory. `out` must exist."""
    from safetensors.torch import save_file
    out, rank0, model_type = Path(out), get_rank() == 0, model.config.model_type
    written, current, size = [], {}, 0  # written: (temporary file, {hub name: bytes}) per shard

    def flush():
        part = out / f".part-{len(written):05d}.safetensors"
        save_file(current, part, metadata={"format": "pt"})
        written.append((part, {k: t.numel() * t.element_size() for k, t in current.items()}))

    for name, full in full_parameters(model):
        if rank0:
            current[vllm_weight_name(name, model_type)] = full.to("cpu", copy=True).contiguous()
            size += full.numel() * full.element_size()
            if size >= shard_bytes:
                flush()
                current, size = {}, 0
    if not rank0:
        return
    if current or not written:
        flush()
    names = ["model.safetensors"] if len(written) == 1 else \
        [f"model-{i:05d}-of-{len(written):05d}.safetensors" for i in range(1, len(written) + 1)]
    for name, (part, _) in zip(names, written):
        os.replace(part, out / name)
    if len(written) > 1:
        index = {"metadata": {"total_size": sum(sum(sizes.values()) for _, sizes in written)},
                 "weight_map": {k: n for n, (_, sizes) in zip(names, written) for k in sizes}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C (SIGINT) inside this context is held until it ends, then raised as KeyboardInterrupt. A checkpoint
    is written whole or not at all: an interrupt in the middle of torch.save or a DCP write otherwise leaves a
    broken zip and a traceback instead of the one-line stop. Outside the main thread it does nothing (Python
    delivers signals to the main thread only); a process that ignores SIGINT goes on ignoring it."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    previous = signal.signal(signal.SIGINT, lambda *_: got.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got and previous is not signal.SIG_IGN:
        raise KeyboardInterrupt


class PhaseClock:
    """Wall time per phase, summed over laps (seconds); on CUDA each lap waits for the device first, so a
    phase is charged for its own kernels (one sync per phase, not per kernel)."""

    def __init__(self, device):
        self.cuda, self.times, self.last = device.type == "cuda", {}, None
        self.lap(None)
        self.started = self.last  # time.time() at construction, after a device sync

    def lap(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        now = time.time()
        if name is not None:
            self.times[name] = self.times.get(name, 0.0) + now - self.last
        self.last = now


class Background:
    """fn(*args, **kwargs) on a thread, started at construction; result() waits for it and returns its value or
    raises its exception (in the caller's thread). `wait=True` waits at construction: the same call, in the
    foreground. The thread is a daemon, so Ctrl-C never waits for it. For work that mostly waits (HTTP requests
    to a judge server) beside the trainer's passes (grpo.py, --judge-overlap); it must run no collective.
    seconds: its wall time, once done."""

    def __init__(self, fn, *args, wait=False, **kwargs):
        import threading
        self.value = self.error = self.seconds = None

        def work():
            start = time.perf_counter()
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as e:  # noqa: BLE001 -- raised again by result(), in the caller's thread
                self.error = e
            self.seconds = time.perf_counter() - start
        self.thread = threading.Thread(target=work, name=getattr(fn, "__name__", "background"), daemon=True)
        self.thread.start()
        if wait:
            self.thread.join()

    def result(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


_NO_MATPLOTLIB = ("charts need matplotlib, an optional extra: pip install -r requirements-report.txt "
                  "(markdown reports are written without it)")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None with a one-line message when matplotlib is not
    installed (it is an optional extra, requirements-report.txt): callers then skip their PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"no chart: {_NO_MATPLOTLIB}", file=sys.stderr)
        return None
    return plt


def versions():
    """The versions that decide a run's numbers: {python, torch, transformers, tokenizers} (constraints.txt pins them)."""
    import platform

    import tokenizers
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["tiny"])
    ap.add_argument("--family", default="qwen2_5_vl", choices=list(FAMILIES), help="model family (FAMILIES)")
    ap.add_argument("--out", default=None, help="folder of the tiny checkpoint (default: the family's, TINY)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    a = ap.parse_args()
    print(build_tiny_checkpoint(a.out or TINY[a.family], seed=a.seed, family=a.family))


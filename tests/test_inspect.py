"""``vismech inspect`` on vismech's own models and on a checkpoint-like folder with a real tokenizer (the Qwen2.5-VL
vocabulary and chat template, a tiny random Qwen2.5-VL behind it), run as a user runs it."""

import json

import torch
from transformers import AutoTokenizer

from real_tokenizers import checkpoint_folder
from vismech.app.cli import main


def test_inspect_tiny_and_organism(tmp_path, capsys):
    for args in (["tiny:idefics2", "--trials", "1", "--device", "cpu"], ["organism", "--trials", "4"]):  # the README's
        out = tmp_path / f"{args[0].replace(':', '_')}.json"
        assert main(["inspect", *args, "--out", str(out)]) == 0
        rec = json.loads(out.read_text())
        assert rec["conventions"] == "vismech" and rec["articles"] == "a"
        assert rec["default_prompt_format"] == "chat"
        assert {r["rule"] for r in rec["tasks"].values()} == {"first_token"}
        sd = rec["tasks"]["scene_description"]
        assert [" ".join(m) for m in sd["mentions"]] == [o for o in sd["framed"].split("there is a ")[1]
                                                        .replace(" and a", "").split(", a ")]
    text = capsys.readouterr().out
    assert "baseline accuracy (4 trials per task)" in text and "<|image_pad|> x " in text


def test_inspect_a_checkpoint_with_a_real_tokenizer(tmp_path, capsys):
    import transformers as tf

    from vismech.models.families import FAMILIES
    from vismech.models.tiny import tiny_config

    folder = checkpoint_folder("qwen2_5_vl", tmp_path / "tok")
    ckpt = tmp_path / "ckpt"
    tok = AutoTokenizer.from_pretrained(folder)
    cfg = tiny_config("qwen2_5_vl", tok)
    torch.manual_seed(0)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    (ckpt / "chat_template.json").write_text((folder / "chat_template.json").read_text())
    FAMILIES["qwen2_5_vl"].image_processor_for(cfg).save_pretrained(ckpt)
    out = tmp_path / "inspect.json"
    assert main(["inspect", str(ckpt), "--trials", "1", "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["template_source"] == "checkpoint chat_template.json" and rec["articles"] == "grammatical"
    assert rec["tasks"]["counting"]["rule"] == "sequence"  # counts 10-20 are two digit tokens in Qwen's vocabulary
    assert rec["tasks"]["color_retrieval"]["answer_tokens"][1][0][0].isupper()  # "Blue"-style form scored too
    framed = rec["tasks"]["color_retrieval"]["framed"]
    assert framed.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             "<|vision_start|><|image_pad|> x ")
    assert set(rec["baseline_accuracy"]) == {"n_per_task", "chat", "plain"}
    assert "default prompt format:" in capsys.readouterr().out
    from vismech.models.load import load_vlm

    vlm = load_vlm(str(ckpt), device="cpu")  # prompt_format="auto": measured on both forms, the better kept
    choice = vlm.prompt_format_choice
    assert choice["chosen_by"] == "first-answer accuracy" and set(choice["accuracy"]) == {"chat", "plain"}
    acc = choice["accuracy"]
    assert vlm.prompt_format == ("plain" if acc["plain"] > acc["chat"] else "chat") == choice["prompt_format"]
    assert vlm.framing_record()["prompt_format"] == vlm.prompt_format


def test_a_run_records_how_the_model_read_its_trials(tmp_path):
    """The manifest holds the framing (template source, articles, prompt format and why, each task's answer
    scoring) and the exact framed text of one trial per task; behaviour rows say which scoring rule they used."""
    import csv

    from vismech.models.load import load_vlm
    from vismech.scenes.stimuli import generate

    out = tmp_path / "run"
    assert main(["run", "behaviour", "--model", "tiny:llava", "--device", "cpu", "--out", str(out),
                 "--set", "n=1", "--set", "generate=false"]) == 0
    fr = json.loads((out / "manifest.json").read_text())["framing"]
    assert fr["articles"] == "a" and fr["prompt_format"] == "chat" and "vismech's own llava" in fr["template_source"]
    assert set(fr["scoring"]) == set(fr["framed"]) == {"scene_description", "color_retrieval", "spatial_relation",
                                                       "counting"}
    vlm = load_vlm("tiny:llava", device="cpu")
    assert fr["framed"]["counting"] == vlm.encode(generate("counting", None, 1, 0)).texts[0]
    rows = list(csv.DictReader(open(out / "results" / "behaviour_trials.csv")))
    assert rows and {r["scoring"] for r in rows} == {"first_token"}

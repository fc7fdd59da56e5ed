"""The CLI on a text task with a Hugging Face model (model.source: hf), end to end and offline.

The test writes a tiny BERT sequence classifier with random weights and a word-level tokenizer trained on its own
corpus into a save_pretrained folder, and a generated text task in the VTAB-1k layout (jsonl splits).
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "sings", "the", "a", "very"]
MAX_LEN = 8


def make_task(root, rng):
    """Class = whether the sentence names an animal that sings (1) or not (0): learnable from the words."""
    task = root / "words"
    task.mkdir(parents=True)
    sizes = {"train800": 48, "val200": 16, "test": 24}
    splits = {}
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            words = [WORDS[int(i)] for i in rng.integers(0, len(WORDS), size=int(rng.integers(3, 7)))]
            rows.append({"text": " ".join(words), "label": int("sings" in words)})
        splits[split] = rows
    splits["train800val200"] = splits["train800"] + splits["val200"]
    for split, rows in splits.items():
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task, splits


def make_model_folder(folder, arch="bert"):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    if arch == "bert":
        cfg = transformers.BertConfig(vocab_size=len(fast), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16, pad_token_id=fast.pad_token_id)
        transformers.BertModel(cfg).save_pretrained(folder)     # a base model: the classifier head starts fresh
    else:  # LLaMA-style: bias-free projections, no pad_token_id in the config (read from the tokenizer)
        cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        transformers.LlamaModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return fast


TARGETS = {"bert": ("[query, value, dense]", "bert.encoder.layer.0.attention.self.query"),
           "llama": ("[q_proj, v_proj, down_proj]", "model.layers.0.self_attn.q_proj")}


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_text_task_end_to_end(cli, tmp_path, arch):
    import numpy as np
    task, splits = make_task(tmp_path / "text", np.random.default_rng(0))
    make_model_folder(tmp_path / "bert-tiny", arch)
    out = tmp_path / "run"
    sets = {"output_dir": out, "model.checkpoint": tmp_path / "bert-tiny", "data.root": tmp_path / "text",
            "data.task": "words", "data.max_length": MAX_LEN, "data.batch_size": 8, "data.eval_batch_size": 16,
            "device": "cpu", "threads": 1, "glora.target_modules": TARGETS[arch][0],
            "supernet.epochs": 2, "supernet.lr": 1e-2, "supernet.probe_paths": 1, "search.generations": 2,
            "search.population": 6, "search.select": 2, "search.mutation": 2, "search.crossover": 2,
            "retrain.epochs": 2, "retrain.lr": 1e-2, "retrain.baselines": "[]"}
    args = ["--config", "text", "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((out / "retrain" / "metrics.json").read_text())
    assert metrics["merge_max_abs_diff"] < 1e-3 and metrics["num_classes"] == 2
    subnet = (out / "search" / "subnet.yaml").read_text()
    assert TARGETS[arch][1] in subnet and "classifier" not in subnet and "score" not in subnet

    # the merged folder is a plain Hugging Face model + tokenizer: its test accuracy is the reported one
    folder = out / "retrain" / "merged"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    test = splits["test"]
    enc = tok([r["text"] for r in test], padding="max_length", truncation=True, max_length=MAX_LEN,
              return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits.argmax(-1)
    acc = float((pred == torch.tensor([r["label"] for r in test])).float().mean())
    assert abs(acc - metrics["test_acc"]) < 1e-6
    ref = transformers.AutoModelForSequenceClassification.from_config(model.config)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())


def test_text_task_baselines_and_lr_grid(cli, tmp_path):
    """The retrain's LoRA and head-only baselines and lr choice on a Hugging Face model: the head-only baseline
    trains the classifier inside the whole model (a transformers classifier has no timm forward_features /
    forward_head to cache features with), and every method's lr is chosen on val200."""
    import numpy as np

    from glora.core.checkpoint import checkpoint_info
    task, _ = make_task(tmp_path / "text", np.random.default_rng(0))
    make_model_folder(tmp_path / "bert-tiny")
    out = tmp_path / "run"
    sets = {"output_dir": out, "model.checkpoint": tmp_path / "bert-tiny", "data.root": tmp_path / "text",
            "data.task": "words", "data.max_length": MAX_LEN, "data.batch_size": 8, "data.eval_batch_size": 16,
            "device": "cpu", "threads": 1, "glora.target_modules": TARGETS["bert"][0],
            "supernet.epochs": 1, "supernet.probe_paths": 1, "search.generations": 1, "search.population": 4,
            "search.select": 2, "search.mutation": 0, "search.crossover": 0, "retrain.epochs": 1,
            "retrain.baselines": "[lora, head]", "retrain.lr_grid": "[1e-3, 1e-2]"}
    args = ["--config", "text", "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert set(m["baselines"]) == {"lora", "head"}
    for info in [m] + list(m["baselines"].values()):
        assert set(info["val_acc_by_lr"]) == {"0.001", "0.01"} and repr(info["lr"]) in info["val_acc_by_lr"]
    head = m["baselines"]["head"]
    assert head["adapter_params"] == 0 and head["head_params"] == m["head_params"] > 0
    trained = checkpoint_info(out / "retrain" / "head_only")["fingerprint"]["params"]
    assert trained and all(n.startswith("classifier.") for n in trained), trained  # the classifier alone trains
    from glora.stages.retrain import _has_feature_head
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "retrain" / "merged")
    assert not _has_feature_head(model)


def test_text_task_errors(cli, tmp_path):
    import numpy as np
    make_task(tmp_path / "text", np.random.default_rng(0))
    make_model_folder(tmp_path / "m")
    base = ["--config", "text", "--no-progress", "--set", f"output_dir={tmp_path / 'o'}",
            "--set", f"data.root={tmp_path / 'text'}", "--set", "data.task=words", "--set", "device=cpu"]
    r = cli(*base, "--set", f"model.checkpoint={tmp_path / 'nothing'}")
    assert r.returncode == 2 and "not a folder written by save_pretrained" in r.stderr, r.stderr
    r = cli(*base, "--set", "model.source=onnx")
    assert r.returncode == 2 and "model.source" in r.stderr, r.stderr
    r = cli(*base, "--set", f"model.checkpoint={tmp_path / 'm'}", "--set", "data.max_length=64")
    assert r.returncode == 2 and "exceed the 16 positions" in r.stderr, r.stderr
    (tmp_path / "text" / "words" / "train800.jsonl").write_text('{"text": "a", "label": "x"}\n')
    r = cli(*base, "--set", f"model.checkpoint={tmp_path / 'm'}", "--set", "data.max_length=8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "train800.jsonl:1: label 'x' is not an integer" in r.stderr, r.stderr


def test_a_bf16_checkpoint_is_trained_from_fp32_master_weights(tmp_path):
    """transformers loads a checkpoint saved in bf16 as a bf16 model; the tool casts it to fp32 (mixed precision
    is autocast's job), so the adapters, the merge check and the fp32 comparison all see fp32 weights."""
    from glora.data.hf import create_hf_classifier
    folder = tmp_path / "bf16"
    make_model_folder(folder)
    base = transformers.BertModel.from_pretrained(folder)
    base.to(torch.bfloat16).save_pretrained(folder)
    model = create_hf_classifier(str(folder), 3, pretrained=False, checkpoint=str(folder))
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, dtypes
    ref = base.embeddings.word_embeddings.weight.to(torch.bfloat16).float()
    got = dict(model.named_parameters())["bert.embeddings.word_embeddings.weight"]
    assert torch.equal(got, ref)  # the bf16 values, widened exactly

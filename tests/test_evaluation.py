"""quept_hf.evaluation against hand computations: perplexity (token-by-token NLL on the tiny LLaMA), top-1
accuracy (tiny ViT / DINOv2), per-bit evaluation and the lm-evaluation-harness adapter (a local task)."""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification, AutoTokenizer

import quept_hf
from quept_hf import QuEPTConfig, get_bits, set_bits
from quept_hf.evaluation import lm_eval_tasks, per_bit, perplexity, top1_accuracy

try:
    from tests import tiny_models
except ModuleNotFoundError:  # `tests/` itself on sys.path
    import tiny_models  # type: ignore[no-redef]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def texts():
    rng = random.Random(0)
    words = ["quant", "elastic", "bits", "model", "layer", "scale", "group", "token", "the", "a"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(10, 40))) for _ in range(12)]


def manual_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int) -> float:
    """The guide's loop, one window at a time, summing -log p(token | window prefix) token by token."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        first_scored = max(end - (end - prev_end), begin + 1)  # masked context; the first token has no prefix
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids[None, begin:end]).logits[0].double(), dim=-1)
        for pos in range(first_scored, end):
            nll -= float(log_probs[pos - begin - 1, ids[pos]])
            count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count)


def token_ids(tokenizer, texts) -> torch.Tensor:
    return tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]


@pytest.mark.parametrize(("seq_len", "stride"), [(64, None), (64, 64), (64, 16), (50, 37)])
def test_matches_manual_nll(model_and_tokenizer, texts, seq_len, stride):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts)
    assert len(ids) > 5 * seq_len and len(ids) % seq_len != 0  # several windows and a shorter last one
    expected = manual_perplexity(model, ids, seq_len, stride or seq_len)
    got = perplexity(model, texts, tokenizer, seq_len=seq_len, stride=stride, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)


def test_single_window_equals_transformers_loss(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts[:1])
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss
    got = perplexity(model, texts[:1], tokenizer, seq_len=len(ids))
    assert got == pytest.approx(math.exp(float(loss)), rel=1e-5)


def test_batch_size_does_not_change_the_result(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    results = [perplexity(model, texts, tokenizer, seq_len=32, batch_size=b) for b in (1, 2, 5, 100)]
    assert max(results) == pytest.approx(min(results), rel=1e-5)


def test_max_windows_spreads_over_the_text(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    ids = token_ids(tokenizer, texts)
    n_windows = -(-len(ids) // 32)
    assert perplexity(model, texts, tokenizer, seq_len=32, max_windows=n_windows + 5) == pytest.approx(
        perplexity(model, texts, tokenizer, seq_len=32)
    )
    # Two windows out of n: the first and the one halfway through the text.
    nll, count = 0.0, 0
    for begin in (0, (n_windows // 2) * 32):
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids[None, begin : begin + 32]).logits[0].double(), -1)
        window = ids[begin : begin + 32]
        nll -= float(log_probs[:-1].gather(1, window[1:, None]).sum())
        count += len(window) - 1
    got = perplexity(model, texts, tokenizer, seq_len=32, max_windows=2)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_peft_model_and_training_mode_are_handled(model_and_tokenizer, texts):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = model_and_tokenizer
    expected = perplexity(model, texts, tokenizer, seq_len=64)
    fresh = AutoModelForCausalLM.from_pretrained(model.name_or_path)
    peft_model = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: no change
    peft_model.train()
    assert perplexity(peft_model, texts, tokenizer, seq_len=64) == pytest.approx(expected, rel=1e-6)
    assert peft_model.training  # the previous mode is restored


def test_bad_arguments(model_and_tokenizer, texts):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, texts, tokenizer, seq_len=32, stride=64)
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(model, ["a"], tokenizer, seq_len=32)


# ------------------------------------------------------------------------------------------------ top-1


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny random ViT classifier (5 classes, 32 px), 10 pixel images and labels with exactly 6 right."""
    tiny = tiny_models.vit(tmp_path_factory.mktemp("vit"))
    model = AutoModelForImageClassification.from_pretrained(tiny.folder).eval()
    pixels = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    labels = predicted.clone()
    labels[[1, 4, 5, 8]] = (labels[[1, 4, 5, 8]] + 1) % 5  # four wrong on purpose
    return model, pixels, labels


def hand_top1(logits: torch.Tensor, labels) -> float:
    return (logits.argmax(-1) == torch.as_tensor(labels)).float().mean().item()


@pytest.mark.parametrize("batch_size", [1, 3, 100])
@pytest.mark.parametrize("form", ["tensor", "images", "batches", "generator"])
def test_top1_matches_hand_computation(vit, form, batch_size):
    model, pixels, labels = vit
    with torch.no_grad():
        expected = hand_top1(model(pixel_values=pixels).logits, labels)
    assert expected == pytest.approx(0.6)
    inputs = {
        "tensor": pixels,
        "images": list(pixels),  # (C, H, W) each
        "batches": [pixels[:3], pixels[3:10]],  # uneven pixel batches, split to batch_size
        "generator": (pixels[i : i + 4] for i in range(0, 10, 4)),  # length unknown up front
    }[form]
    assert top1_accuracy(model, inputs, labels.tolist(), batch_size=batch_size) == pytest.approx(expected)


def test_top1_with_an_image_processor(vit):
    from transformers import ViTImageProcessorPil

    model, _, _ = vit
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32})
    images = tiny_models.images(7, seed=3)
    with torch.no_grad():
        logits = model(**processor(images=images, return_tensors="pt")).logits
    labels = logits.argmax(-1)
    labels[0] = (labels[0] + 1) % 5
    got = top1_accuracy(model, images, labels, image_processor=processor, batch_size=3)
    assert got == pytest.approx(hand_top1(logits, labels)) == pytest.approx(6 / 7)


def test_top1_with_a_head_on_a_backbone(tmp_path):
    """DINOv2 has no classifier: a linear probe on the CLS token (as benchmarks/vit_dinov2.py does)."""
    tiny = tiny_models.vit(tmp_path, "dinov2")
    backbone = tiny.auto_class.from_pretrained(tiny.folder).eval()
    torch.manual_seed(1)
    head = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(32, 4))  # dropout: eval mode matters
    head.train()
    pixels = torch.randn(9, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        output = backbone(pixel_values=pixels)
        logits = head.eval()(output.last_hidden_state[:, 0])
        pooled = head(output.pooler_output)
    head.train()
    labels = torch.arange(9) % 4
    expected = hand_top1(logits, labels)
    assert top1_accuracy(backbone, pixels, labels, batch_size=4, head=head) == pytest.approx(expected)
    assert head.training  # restored
    ids_head = lambda f: head.eval()(f).argmax(-1)  # noqa: E731  # a head may return class ids
    assert top1_accuracy(backbone, pixels, labels, head=ids_head) == pytest.approx(expected)
    by_pooler = top1_accuracy(backbone, pixels, labels, head=head, features=lambda out: out.pooler_output)
    assert by_pooler == pytest.approx(hand_top1(pooled, labels))
    with pytest.raises(ValueError, match=r"no logits.*head="):
        top1_accuracy(backbone, pixels, labels)


def test_top1_on_a_peft_model_restores_training_mode(vit):
    from peft import LoraConfig, get_peft_model

    model, pixels, labels = vit
    fresh = AutoModelForImageClassification.from_pretrained(model.name_or_path)
    peft_model = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # B = 0: no change
    peft_model.train()
    assert top1_accuracy(peft_model, pixels, labels, batch_size=4) == pytest.approx(0.6)
    assert peft_model.training


def test_top1_bad_arguments(vit):
    model, pixels, labels = vit
    with pytest.raises(ValueError, match="10 images but 9 labels"):
        top1_accuracy(model, pixels, labels[:9])
    with pytest.raises(ValueError, match="10 images but 11 labels"):
        top1_accuracy(model, (p for p in pixels), [*labels.tolist(), 0])
    with pytest.raises(ValueError, match="more images than the 9 labels"):
        top1_accuracy(model, (p for p in pixels), labels[:9], batch_size=4)
    with pytest.raises(ValueError, match="no labels"):
        top1_accuracy(model, pixels[:0], [])
    with pytest.raises(ValueError, match="no images"):
        top1_accuracy(model, iter([]), [1])
    with pytest.raises(ValueError, match="image_processor"):
        top1_accuracy(model, tiny_models.images(2), [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.4"):
        top1_accuracy(model, pixels, torch.full_like(labels, 5))  # e.g. 1-based labels, 5 classes
    with pytest.raises(ValueError, match="integer class id"):
        top1_accuracy(model, pixels, labels.float())
    with pytest.raises(ValueError, match="batch_size"):
        top1_accuracy(model, pixels, labels, batch_size=0)
    with pytest.raises(ValueError, match="features= only applies with a head"):
        top1_accuracy(model, pixels, labels, features=lambda out: out.logits)
    assert not model.training


# --------------------------------------------------------------------------------------------- per bit

PLAN = "mixed-test"
PLAN_BITS = {"model.layers.0.mlp.down_proj": 2, "model.layers.1.self_attn.q_proj": 4}


@pytest.fixture(scope="module")
def quept_llama(tiny_llama_dir):
    """The tiny LLaMA made elastic, MB-CLoRA adapters attached (calibrate with 0 epochs) and a stored plan."""
    plan = {PLAN: {"avg_bits": 3.0, "target": 3, "bits": PLAN_BITS}}
    config = QuEPTConfig(ranks=[4] * 4, group_size=16, smoothing=False, plans=plan)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=config).eval()
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    quept_hf.calibrate(model, ids, epochs=0, num_samples=4, seq_len=16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B starts at 0: seeded values make each bit-width's delta count
        for name, param in model.named_parameters():
            if ".mbclora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    return model


def test_per_bit_evaluates_each_bit_and_restores(quept_llama, model_and_tokenizer, texts):
    model, (_, tokenizer) = quept_llama, model_and_tokenizer
    set_bits(model, 5)
    got = per_bit(model, lambda m: (get_bits(m), perplexity(m, texts, tokenizer, seq_len=64)), bits=[2, 8, 16, PLAN])
    assert list(got) == [2, 8, 16, PLAN]
    assert get_bits(model) == 5
    for b, (active, value) in got.items():
        set_bits(model, b)
        assert active == get_bits(model)
        assert value == perplexity(model, texts, tokenizer, seq_len=64)
    assert len({value for _, value in got.values()}) == 4  # the bit-widths really differ
    set_bits(model, 5)
    assert list(per_bit(model, get_bits)) == [*quept_hf.quept_config(model).bits, 16]  # default: all + float


def test_per_bit_restores_a_plan_a_mapping_and_after_an_error(quept_llama):
    model = quept_llama
    set_bits(model, PLAN)
    plan_bits = get_bits(model)
    assert isinstance(plan_bits, dict) and plan_bits.items() >= PLAN_BITS.items()
    per_bit(model, get_bits, bits=[3])
    assert get_bits(model) == plan_bits
    layers = quept_hf.inspection.mbclora_layers(model).values()
    assert {layer.active_adapters[0] for layer in layers} == {PLAN}  # by name
    hand = {"model.layers.0.self_attn.v_proj": 3}
    set_bits(model, 6)
    set_bits(model, hand)
    before = get_bits(model)
    per_bit(model, get_bits, bits=[2])
    assert get_bits(model) == before

    def fails_at_4(m):
        if get_bits(m) == 4:
            raise RuntimeError("boom")

    set_bits(model, 7)
    with pytest.raises(RuntimeError, match="boom"):
        per_bit(model, fails_at_4, bits=[2, 4, 6])
    assert get_bits(model) == 7


def test_per_bit_checks_everything_first(quept_llama, model_and_tokenizer):
    calls = []
    for bad in ([9], [4, "mixed-nope"], [], [4.0], [True]):
        with pytest.raises(ValueError, match="per_bit"):
            per_bit(quept_llama, calls.append, bits=bad)
    assert calls == []
    with pytest.raises(ValueError, match="not a QuEPT model"):
        per_bit(model_and_tokenizer[0], calls.append)


# ------------------------------------------------------------------------------------ lm-evaluation-harness

LM_TASK = "quept_tiny_choice"


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """A multiple-choice task read from a local JSON-lines file (no Hub), choices of equal length."""
    rng = random.Random(1)
    letters = "abcdefghij"
    docs = [
        {
            "question": "".join(rng.choice(letters + " ") for _ in range(12)),
            "choices": ["".join(rng.choice(letters) for _ in range(4)) for _ in range(4)],
            "label": i % 4,
        }
        for i in range(12)
    ]
    folder = tmp_path_factory.mktemp("lm_eval_task")
    (folder / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (folder / "tasks").mkdir()
    (folder / "tasks" / f"{LM_TASK}.yaml").write_text(
        f"task: {LM_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return docs, str(folder / "tasks")


@torch.no_grad()
def hand_loglikelihoods(model, tokenizer, doc) -> list[float]:
    """sum log p(" " + choice | question), token by token, split the way lm-eval's HFLM splits the pair."""
    out = []
    for choice in doc["choices"]:
        whole = tokenizer.encode(doc["question"] + " " + choice)
        start = len(tokenizer.encode(doc["question"]))
        log_probs = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(float(log_probs[pos - 1, whole[pos]]) for pos in range(start, len(whole))))
    return out


def test_lm_eval_tasks_match_hand_loglikelihoods(quept_llama, tiny_llama_dir, local_task):
    pytest.importorskip("lm_eval")
    model, (docs, include_path) = quept_llama, local_task
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    set_bits(model, 5)
    results = lm_eval_tasks(
        model, tokenizer, LM_TASK, bits=[2, 8], include_path=include_path, include_defaults=False, log_samples=True
    )
    assert list(results) == [2, 8]
    assert get_bits(model) == 5  # restored
    hand = {}
    for b, result in results.items():
        set_bits(model, b)
        hand[b] = [hand_loglikelihoods(model, tokenizer, doc) for doc in docs]
        samples = sorted(result["samples"][LM_TASK], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(len(docs)))
        for sample, expected in zip(samples, hand[b], strict=True):
            assert [resp[0] for resp in sample["filtered_resps"]] == pytest.approx(expected, abs=1e-4)
        accuracy = sum(max(range(4), key=lls.__getitem__) == d["label"] for lls, d in zip(hand[b], docs, strict=True))
        assert result["results"][LM_TASK]["acc,none"] == pytest.approx(accuracy / len(docs))
    assert (torch.tensor(hand[2]) - torch.tensor(hand[8])).abs().max() > 0.05  # 2 and 8 bits really differ


def test_lm_eval_tasks_argument_errors(quept_llama, model_and_tokenizer, local_task):
    pytest.importorskip("lm_eval")
    model, (_, tokenizer) = quept_llama, model_and_tokenizer
    with pytest.raises(ValueError, match="per_bit"):
        lm_eval_tasks(model, tokenizer, LM_TASK, bits=[9])
    with pytest.raises(ValueError, match="not both"):
        lm_eval_tasks(model, tokenizer, LM_TASK, include_path=local_task[1], task_manager=object())
    with pytest.raises(ValueError, match="no task"):
        lm_eval_tasks(model, tokenizer, [])
    with pytest.raises(ValueError, match="not a QuEPT model"):
        lm_eval_tasks(model_and_tokenizer[0], tokenizer, LM_TASK)


def test_lm_eval_tasks_without_lm_eval_says_how_to_install(quept_llama, model_and_tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install 'quept-hf\[eval\]'"):
        lm_eval_tasks(quept_llama, model_and_tokenizer[1], LM_TASK)


def test_perplexity_windows_are_the_scored_ones():
    from quept_hf.evaluation import perplexity_windows

    assert perplexity_windows(1000, 512) == [(0, 512, 512), (512, 1000, 488)]
    assert perplexity_windows(1000, 512, stride=256) == [(0, 512, 512), (256, 768, 256), (512, 1000, 232)]
    spread = perplexity_windows(100 * 10, 10, max_windows=4)
    assert [b for b, _, _ in spread] == [0, 250, 500, 750]  # evenly over the text, not its beginning
    with pytest.raises(ValueError, match="stride=600"):
        perplexity_windows(1000, 512, stride=600)

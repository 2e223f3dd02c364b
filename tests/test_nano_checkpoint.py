"""The nano checkpoint builder, trainer and evaluator, on a fresh checkpoint built in tmp."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from PIL import Image  # noqa: E402
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from vlmlab.families import get_family  # noqa: E402
from vlmlab.families import nano as nano_family  # noqa: E402
from vlmlab.nano.build import build_checkpoint  # noqa: E402
from vlmlab.nano.data import collate, encode_training  # noqa: E402
from vlmlab.nano.tasks import generate  # noqa: E402
from vlmlab.nano.train import Trainer, TrainConfig, forward_loss  # noqa: E402
from vlmlab.protocol.core import Chat, ImagePart, Message  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("nano") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def processor(ckpt: Path):
    return AutoProcessor.from_pretrained(ckpt)


def test_loads_with_auto_classes_and_matches_family_constants(ckpt: Path, processor) -> None:
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "PixtralProcessor"
    assert model.dtype == torch.float32
    cfg = json.loads((ckpt / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    kv = get_family("nano").checkpoint().kv
    assert (text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"]) == (
        kv.layers, kv.kv_heads, kv.head_dim,
    )  # fmt: skip
    assert text["max_position_embeddings"] == nano_family.MAX_MODEL_LEN
    assert vision["patch_size"] == nano_family.PATCH == processor.patch_size
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["size"]["longest_edge"] == nano_family.LONGEST_EDGE
    assert processor.image_processor.size["longest_edge"] == nano_family.LONGEST_EDGE
    size_mb = sum(p.stat().st_size for p in ckpt.iterdir()) / 1e6
    assert size_mb < 20
    tok = processor.tokenizer
    for special in ("<s>", "</s>", "[INST]", "[/INST]", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
        assert tok.tokenize(f"a{special}b")[1] == special
    assert tok.decode(tok("What is 42?").input_ids) == "What is 42?"
    assert cfg["image_token_index"] == tok.convert_tokens_to_ids("[IMG]")


@pytest.mark.parametrize(
    "size", [(1, 1), (17, 16), (64, 64), (141, 126), (192, 192), (193, 50), (500, 90), (40, 700)]
)
def test_image_token_count_matches_family_rule(processor, size: tuple[int, int]) -> None:
    w, h = size
    enc = processor(text="[IMG]Q?", images=[Image.new("RGB", (w, h), "white")], return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    special = {processor.tokenizer.convert_tokens_to_ids(t) for t in ("[IMG]", "[IMG_BREAK]", "[IMG_END]")}
    assert sum(i in special for i in ids) == get_family("nano").image_tokens(w, h)


def _openai(chat: Chat, image_kind: str) -> list[dict]:
    out = []
    for m in chat.messages:
        if len(m.content) == 1 and not m.images:
            out.append({"role": m.role, "content": m.text})
            continue
        parts = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append(
                    {"type": "image"} if image_kind == "image"
                    else {"type": "image_url", "image_url": {"url": p.ref}}
                )  # fmt: skip
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


IMG = ImagePart(ref="http://x/a.png")
CHATS = [
    Chat.single("What colour is the shape?", [IMG]),
    Chat((Message.of("user", "hello"),)),
    Chat((
        Message.of("system", "Answer in one word."),
        Message.of("user", IMG, "What shape?", IMG, "and this?"),
        Message.of("assistant", "circle"),
        Message.of("user", "Which image has more circles?"),
    )),  # fmt: skip
    Chat((
        Message.of("system", "A"),
        Message.of("system", "B"),
        Message.of("user", "first"),
        Message.of("assistant", "ok"),
        Message.of("user", IMG, "second"),
        Message.of("assistant", "done"),
    )),  # fmt: skip
]


@pytest.mark.parametrize("image_kind", ["image", "image_url"])
@pytest.mark.parametrize("index", range(len(CHATS)))
def test_chat_template_equals_render_prompt(processor, index: int, image_kind: str) -> None:
    chat = CHATS[index]
    messages = _openai(chat, image_kind)
    expected = nano_family.render_prompt(chat)
    assert processor.apply_chat_template(messages, tokenize=False) == expected
    assert processor.tokenizer.apply_chat_template(messages, tokenize=False) == expected


def test_training_labels_cover_only_answers(processor) -> None:
    import random

    sample = generate(1, seed=3, tasks=["chart_value"])[0]
    enc = encode_training(sample, processor, random.Random(0), max_extra=3)
    tok = processor.tokenizer
    answers = tok.decode([t for t in enc.labels if t != -100])
    text = tok.decode(enc.input_ids)
    # every assistant span of the rendered chat, in order: the text between [/INST] and </s>
    spans = [chunk.split("</s>")[0] for chunk in text.split("[/INST]")[1:]]
    assert spans[0] == sample.answer and len(spans) >= 1
    assert set(spans[1:]) <= {a for _, a in sample.extra}
    assert answers == "</s>".join(spans) + "</s>"
    assert enc.labels.count(-100) == len(enc.labels) - len(tok("</s>".join(spans) + "</s>").input_ids)


def _trainer(out: Path, ckpt: Path, steps: int, lr: float = 3e-4) -> Trainer:
    base = out / "base"
    if not base.exists():  # reuse the module's checkpoint instead of building another one
        import shutil

        shutil.copytree(ckpt, base)
    cfg = TrainConfig(
        out=str(out), steps=steps, batch_size=4, pool_batches=2, lr=lr, warmup_steps=1,
        eval_every=10_000, eval_n=10, tasks=("color", "count"), progress=False, bf16=False,
        checkpoint_minutes=1e9,
    )  # fmt: skip
    return Trainer(cfg)


def test_forward_loss_equals_model_loss(tmp_path: Path, ckpt: Path) -> None:
    tr = _trainer(tmp_path / "run", ckpt, steps=1)
    batch = tr.next_batch()
    with torch.no_grad():
        assert float(forward_loss(tr.model, batch)) == pytest.approx(float(tr.model(**batch).loss), rel=1e-5)


def test_a_few_steps_reduce_the_loss(tmp_path: Path, ckpt: Path, processor) -> None:
    import random

    tr = _trainer(tmp_path / "run", ckpt, steps=100, lr=1e-3)
    samples = generate(8, seed=5, tasks=["color", "ocr"])
    batch = collate([encode_training(s, processor, random.Random(0)) for s in samples], tr.pad_id)
    with torch.no_grad():
        before = float(forward_loss(tr.model, batch))
    for _ in range(8):
        tr.train_step(batch)
    with torch.no_grad():
        after = float(forward_loss(tr.model, batch))
    assert after < before * 0.8


def test_resume_continues_from_the_same_step(tmp_path: Path, ckpt: Path) -> None:
    # uninterrupted: 5 steps (crosses a pool boundary: 2 batches per pool)
    straight = _trainer(tmp_path / "a", ckpt, steps=5)
    acc = straight.run()
    assert set(acc) == {"color", "count", "mean"}
    # interrupted after 3 steps, then resumed to 5
    first = _trainer(tmp_path / "b", ckpt, steps=3)
    first.run()
    resumed = _trainer(tmp_path / "b", ckpt, steps=5)
    assert resumed.sched.step == 3 and resumed.pool_used == 1
    resumed.run()
    assert resumed.sched.step == 5
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert (tmp_path / "b" / "best" / "config.json").exists()
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 5]


def test_evaluate_reports_every_task(ckpt: Path) -> None:
    from vlmlab.nano.evaluate import eval_samples, evaluate
    from vlmlab.nano.tasks import TASKS

    acc = evaluate(ckpt, n=10, batch_size=5)
    assert set(acc) == {*TASKS, "mean"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    # held-out samples never coincide with training samples (disjoint seeds)
    assert eval_samples(3)[0].id != generate(1)[0].id


def test_packaged_checkpoint_batched_decoding_equals_one_by_one() -> None:
    """Left-padded batched greedy decoding (the evaluator's) answers as unbatched decoding."""
    from vlmlab.nano import checkpoint_path
    from vlmlab.nano.evaluate import eval_samples, predict

    path = checkpoint_path()
    assert (path / "config.json").exists(), "the packaged nano checkpoint is missing"
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path)
    samples = eval_samples(10, seed=5)
    assert predict(model, processor, samples, batch_size=5) == predict(
        model, processor, samples, batch_size=1
    )


def test_pools_from_worker_processes_equal_pools_built_in_process(tmp_path: Path, ckpt: Path) -> None:
    tr = _trainer(tmp_path / "run", ckpt, steps=1)
    tr.cfg.data_workers = 1
    from_workers = [tr._pool_at(0), tr._pool_at(8)]  # two pools of 2 batches x 4 samples
    here = [tr._build_pool(0), tr._build_pool(8)]
    tr._feed = None
    for a, b in zip(from_workers, here):
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            assert all(torch.equal(x[k], y[k]) for k in x)
    assert from_workers[0][0]["pixel_values"].dtype == torch.float16  # halved for the transfer


def test_grown_checkpoint_computes_the_same_function(tmp_path: Path, ckpt: Path, processor) -> None:
    from vlmlab.nano.build import grow_checkpoint
    from vlmlab.nano.data import question_prompt
    from vlmlab.protocol.errors import ConfigError

    old = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    deeper = old.config.vision_config.num_hidden_layers + 1
    grown = grow_checkpoint(ckpt, tmp_path / "grown", vision_layers=deeper, seed=1)
    new = AutoModelForImageTextToText.from_pretrained(grown).eval()
    assert new.config.vision_config.num_hidden_layers == deeper
    samples = generate(3, seed=4)
    enc = processor(text=[question_prompt(s) for s in samples], images=[s.images for s in samples],
                    padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(old(**enc).logits, new(**enc).logits, atol=1e-5)
    with pytest.raises(ConfigError, match=f"already has {deeper}"):
        grow_checkpoint(grown, tmp_path / "again", vision_layers=deeper)


@pytest.mark.parametrize("text", ["vision_layers=x", "colour=3", "vision_layers"])
def test_bad_arch_overrides_name_the_item(text: str) -> None:
    from vlmlab.nano.train import parse_arch
    from vlmlab.protocol.errors import ConfigError

    with pytest.raises(ConfigError, match="bad --arch item"):
        parse_arch(text)
    assert parse_arch("vision_layers=4, vision_hidden=192") == {"vision_layers": 4, "vision_hidden": 192}

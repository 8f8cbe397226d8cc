"""Sample generations: logged as TensorBoard text at each validation, without changing how the model trains."""

from __future__ import annotations

import lightning as L
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, cpu_trainer, shown_by_tensorboard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qlora_lit.data import KoAlpacaDataModule
from qlora_lit.model import LoraArgs, QuantizationArgs
from qlora_lit.module import QLoRAModule
from qlora_lit.optim import OptimizerArgs
from qlora_lit.samples import DEFAULT_PROMPTS, SampleGenerations, greedy_answers

PROMPTS = ["한국의 아이돌 문화에 대해 알려줘.", "김치는 어떻게 만들어?"]


def train(root, callbacks: list) -> QLoRAModule:
    L.seed_everything(5)
    module = QLoRAModule(
        TINY_MODEL,
        quantization=QuantizationArgs(compute_dtype="float32"),
        lora=LoraArgs(r=4, alpha=8, dropout=0.1),  # dropout draws from the random stream and is off in eval mode
        optimizer=OptimizerArgs(name="adamw", lr=5e-3),
    )
    data = KoAlpacaDataModule(SAMPLE_DATA, TINY_MODEL, max_length=96, batch_size=4, val_size=4)
    trainer = cpu_trainer(
        root,
        max_steps=4,
        callbacks=callbacks,
        limit_val_batches=1,
        num_sanity_val_steps=1,
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    return module


def test_samples_are_logged_and_leave_training_unchanged(tmp_path):
    plain = train(tmp_path / "plain", callbacks=[])
    sampled = train(tmp_path / "sampled", callbacks=[SampleGenerations(PROMPTS, max_new_tokens=6)])

    expected = dict(plain.named_parameters())
    for name, param in sampled.named_parameters():
        if param.requires_grad:  # same eval/train modes and random numbers: bit for bit the same adapters
            torch.testing.assert_close(param, expected[name], rtol=0, atol=0, msg=name)

    events = EventAccumulator(str(tmp_path / "sampled" / "run" / "version_0"), size_guidance={"tensors": 0})
    events.Reload()
    for index, prompt in enumerate(PROMPTS):
        logged = events.Tensors(f"samples/{index}/text_summary")
        assert [event.step for event in logged] == [0, 2, 4]  # the sanity check (the untrained baseline), validations
        assert all(prompt in shown_by_tensorboard(event.tensor_proto.string_val[0].decode()) for event in logged)


def test_batched_answers_equal_one_by_one(tokenizer):
    module = QLoRAModule(TINY_MODEL, quantization=QuantizationArgs(compute_dtype="float32"))
    module.configure_model()
    model = module.model.eval()
    prompts = list(DEFAULT_PROMPTS)  # different lengths: left padding must not change any answer
    batched = greedy_answers(model, tokenizer, prompts, max_new_tokens=8)
    assert batched == [greedy_answers(model, tokenizer, [prompt], max_new_tokens=8)[0] for prompt in prompts]
    assert all(answer.strip() for answer in batched)


CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"


def test_a_chat_format_runs_samples_are_prompted_with_the_chat_template(tmp_path, monkeypatch):
    """The samples' prompts are rendered as training renders them (data.prompt_format, data.system_prompt), not always
    as KoAlpaca."""
    import json
    import shutil

    import qlora_lit.samples
    from qlora_lit.assets import resolve_asset

    model = tmp_path / "chat-model"
    shutil.copytree(resolve_asset(TINY_MODEL), model)
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": CHAT_TEMPLATE}))
    prompts = []

    def recording(model_, tokenizer, instructions, max_new_tokens, synced=False, prompt_format="koalpaca", **kwargs):
        rows = [{"instruction": instruction} for instruction in instructions]
        ids = qlora_lit.samples.encode_prompts(tokenizer, rows, prompt_format, kwargs["system_prompt"])
        prompts.extend(tokenizer.decode(row) for row in ids)
        return greedy_answers(model_, tokenizer, instructions, max_new_tokens, synced, prompt_format, **kwargs)

    monkeypatch.setattr(qlora_lit.samples, "greedy_answers", recording)
    module = QLoRAModule(str(model), quantization=QuantizationArgs(compute_dtype="float32"), lora=LoraArgs(r=4))
    data = KoAlpacaDataModule(
        SAMPLE_DATA, str(model), prompt_format="chat", system_prompt="짧게.", max_length=96, val_size=4
    )
    trainer = cpu_trainer(tmp_path, max_steps=2, callbacks=[SampleGenerations(["안녕?"], max_new_tokens=2)])
    trainer.fit(module, data)
    assert prompts and set(prompts) == {"<system>짧게.<user>안녕?<assistant>"}

"""A tiny, fully offline, deterministic TRL ``GRPOTrainer`` for end-to-end tests.

Everything is built in code: a char-level tokenizer, a 2-layer Llama with
hidden size 32 initialised from ``torch.manual_seed(seed)``, eight plain-text
prompts and a reward that counts a character. Nothing is downloaded.

TRL quirk: with ``beta != 0`` the trainer builds its reference model with
``from_pretrained(model.config._name_or_path)``; a model built from a config has
an empty name, so the initial model is saved under ``output_dir/init_model`` and
its config points there.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz ?"
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

PROMPTS = [
    "say a",
    "the cat",
    "abc",
    "what is up?",
    "hello there",
    "one two",
    "banana",
    "zzz",
]

REWARD_CHAR = "a"


def make_tokenizer():
    """A char-level ``PreTrainedTokenizerFast`` (left padding, pad/bos/eos/unk)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def make_model(tokenizer, seed: int = 0):
    """A tiny randomly initialised float32 Llama causal LM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def make_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": list(PROMPTS)})


def count_char_reward(completions, **kwargs):
    """Deterministic reward: occurrences of ``REWARD_CHAR`` in each completion."""
    return [float(c.count(REWARD_CHAR)) for c in completions]


def cpu_training_args(output_dir, seed: int, **specific) -> dict:
    """The trainer arguments both e2e suites share: a deterministic CPU run of
    3 steps with plain SGD and no gradient clipping (AdamW's normalised first
    steps and norm clipping would hide a wrong gradient scale in the updated
    parameters), plus the trainer-specific ``specific``."""
    return dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=4,
        max_steps=3,
        logging_steps=1,
        seed=seed,
        data_seed=seed,
        optim="sgd",
        max_grad_norm=0.0,
        save_strategy="no",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **specific,
    )


def make_trainer(output_dir, *, seed: int = 0, use_posttrain: bool = False, **grpo_config_overrides):
    """Build a tiny CPU ``GRPOTrainer``; with ``use_posttrain`` its loss goes through posttrain."""
    from trl import GRPOConfig, GRPOTrainer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, seed=seed)
    # The reference model (beta != 0) is loaded from the model's name_or_path.
    init_dir = output_dir / "init_model"
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    model.config._name_or_path = str(init_dir)
    model.name_or_path = str(init_dir)

    config = cpu_training_args(
        output_dir,
        seed,
        num_generations=4,
        max_completion_length=8,
        learning_rate=0.1,
        beta=0.04,
        num_iterations=2,
        log_completions=False,
    )
    config.update(grpo_config_overrides)
    args = GRPOConfig(**config)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=count_char_reward,
        args=args,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )
    if use_posttrain:
        from posttrain.integrations.trl import use_posttrain as _use_posttrain

        trainer = _use_posttrain(trainer)
    return trainer


def snapshot_params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_and_collect(trainer):
    """Train; return the per-step logged losses and a copy of the final parameters."""
    trainer.train()
    return logged(trainer, "loss"), snapshot_params(trainer.model)


def logged(trainer, key: str) -> list[float]:
    """The per-step values of ``key`` in ``trainer.state.log_history``."""
    return [float(entry[key]) for entry in trainer.state.log_history if key in entry]

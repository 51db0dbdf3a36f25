"""``twinkle quickstart``: teach a toy model its name with a LoRA adapter, then ask it "who are you?".

The training loop (``train_self_cognition``) takes any object with the training API of
``docs/local-api.md`` (``forward_backward``, ``clip_grad_and_step``, ``calculate_metric``), so the same code
drives a local ``twinkle.model.TransformersModel`` or a remote ``twinkle_client.model.TransformersModel``.
``run_quickstart`` builds local objects when none are given.

The builtin models are toys (randomly initialised, ~1M parameters for ``tiny``): the quickstart shows real
learning on a small memorisation task, not a useful assistant.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from twinkle.data import ChatEncoder, DataLoader, self_cognition_dataset
from twinkle.data.self_cognition import DEFAULT_AUTHOR, DEFAULT_NAME
from twinkle.types import InvalidInputError, LoraConfig


@dataclass
class QuickstartConfig:
    """Settings tuned so ``builtin://tiny`` reliably learns its identity in about 10 CPU-seconds."""

    model_id: str = "builtin://tiny"
    name: str = DEFAULT_NAME
    author: str = DEFAULT_AUTHOR
    steps: int = 100
    batch_size: int = 16
    lr: float = 2e-3
    rank: int = 32
    warmup_steps: int = 3
    seed: int = 0
    question: str = "who are you?"
    max_tokens: int = 32
    adapter_name: str = "quickstart"
    output_dir: str | None = None

    def validate(self) -> None:
        if self.steps < 1:
            raise InvalidInputError("steps must be at least 1", field="steps")
        if self.batch_size < 1:
            raise InvalidInputError("batch_size must be at least 1", field="batch_size")
        if not self.lr > 0:
            raise InvalidInputError("lr must be positive", field="lr")
        if not self.name.strip():
            raise InvalidInputError("name must not be empty", field="name")


@dataclass
class QuickstartResult:
    model_id: str
    name: str
    losses: list[float]
    seconds: float
    question: str
    answer: str
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # phase -> seconds, in order

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]

    @property
    def loss_ratio(self) -> float:
        return self.last_loss / self.first_loss if self.first_loss else float("nan")

    @property
    def loss_halved(self) -> bool:
        """The loss fell by more than half."""
        return self.last_loss < 0.5 * self.first_loss

    @property
    def name_in_answer(self) -> bool:
        return self.name.lower() in self.answer.lower()

    @property
    def passed(self) -> bool:
        return self.loss_halved and self.name_in_answer


def self_cognition_batches(tokenizer: Any, cfg: QuickstartConfig) -> Iterator[list[dict[str, list[int]]]]:
    """Endless shuffled batches of encoded self-cognition conversations (``{input_ids, labels}``)."""
    data = self_cognition_dataset(cfg.name, cfg.author).map(ChatEncoder(tokenizer))
    return DataLoader(data, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed).cycle()


def train_self_cognition(model: Any, batches: Iterator[Any], steps: int, *, progress: bool = True,
                         desc: str = "training", file: TextIO | None = None) -> list[float]:
    """``steps`` optimizer steps of cross-entropy; returns the loss (per trained token) of every step.

    ``model``: anything with ``forward_backward(inputs=...)``, ``clip_grad_and_step()`` and
    ``calculate_metric(is_training=True)`` — local or remote. A model with ``forward_backward_async`` and
    ``optim_step_async`` (``twinkle_client``) gets each step sent right behind its forward_backward: one
    round trip per step instead of two."""
    bar = _progress(steps, desc, progress, file)
    losses: list[float] = []
    try:
        pipelined = hasattr(model, "forward_backward_async") and hasattr(model, "optim_step_async")
        for _ in range(steps):
            if pipelined:  # remote: send the step right behind its forward_backward (the server keeps the order)
                fb = model.forward_backward_async(inputs=next(batches))
                step = model.optim_step_async()
                fb.result()
                step.result()
            else:
                model.forward_backward(inputs=next(batches))
                model.clip_grad_and_step()
            loss = float(model.calculate_metric(is_training=True)["loss"])
            losses.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return losses


def run_quickstart(cfg: QuickstartConfig | None = None, *, model: Any = None, sampler: Any = None,
                   progress: bool = True, file: TextIO | None = None) -> QuickstartResult:
    """Train the self-cognition adapter and ask the question greedily. Pass ``model``/``sampler`` to run on
    objects you made (e.g. remote ones); otherwise local ``TransformersModel``/``Sampler`` are created."""
    cfg = cfg or QuickstartConfig()
    cfg.validate()
    if model is None:
        model = _local_model(cfg)
    if sampler is None:
        from twinkle.sampler import Sampler

        sampler = Sampler(model)
    t0 = time.perf_counter()
    model.add_adapter_to_model(cfg.adapter_name, LoraConfig(rank=cfg.rank, alpha=2.0 * cfg.rank, seed=cfg.seed))
    if hasattr(model, "set_current_adapter"):
        model.set_current_adapter(cfg.adapter_name)
    model.set_optimizer("AdamW", lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0, grad_clip_norm=1.0)
    model.set_lr_scheduler("cosine", num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
                           min_lr_ratio=0.1)
    batches = self_cognition_batches(model.get_tokenizer(), cfg)
    t1 = time.perf_counter()
    losses = train_self_cognition(model, batches, cfg.steps, progress=progress, file=file)
    t2 = time.perf_counter()
    answer = sampler.generate(cfg.question, max_tokens=cfg.max_tokens, temperature=0.0)
    t3 = time.perf_counter()
    timings = {"set-up": t1 - t0, "training": t2 - t1, "sampling": t3 - t2}
    return QuickstartResult(cfg.model_id, cfg.name, losses, t3 - t0, cfg.question, answer, model_label(cfg.model_id),
                            timings=timings)


def run_quickstart_remote(cfg: QuickstartConfig | None = None, *, url: str, api_key: str | None,
                          progress: bool = True, file: TextIO | None = None) -> QuickstartResult:
    """``run_quickstart`` on a Twinkle server through ``twinkle_client``: the same loop, with the remote
    ``twinkle_client.model.TransformersModel`` and ``twinkle_client.sampler.Sampler``. The session is
    closed at the end (its adapter is checkpointed and unloaded on the server)."""
    import twinkle_client
    from twinkle_client.model import TransformersModel
    from twinkle_client.sampler import Sampler

    cfg = cfg or QuickstartConfig()
    cfg.validate()
    session = twinkle_client.connect(url, api_key, persist_state=False, make_current=False,
                                     metadata={"purpose": "twinkle quickstart"})
    try:
        model = TransformersModel(cfg.model_id, seed=cfg.seed, session=session)
        res = run_quickstart(cfg, model=model, sampler=Sampler(model), progress=progress, file=file)
        res.extra["server"] = url
        res.extra.setdefault("where", f"server {url} (twinkle_client)")
        res.extra["run_id"] = model.run_id
        return res
    finally:
        session.close()


def model_label(model_id: str) -> str:
    """An honest one-line description of the base model."""
    if model_id.startswith("builtin://"):
        from twinkle.model.builtin import BUILTIN_MODELS

        spec = BUILTIN_MODELS.get(model_id.split("://", 1)[1])
        if spec is not None:
            return f"{model_id}: a {spec.description}"
    return model_id


def format_summary(res: QuickstartResult) -> str:
    rows = [
        ("model", res.model_id),
        *([("where", str(res.extra["where"]))] if res.extra.get("where") else []),
        ("steps", str(res.steps)),
        ("first loss", f"{res.first_loss:.4f}"),
        ("last loss", f"{res.last_loss:.4f}"),
        ("last / first", f"{res.loss_ratio:.3f}"),
    ]
    rows += [(phase, f"{sec:.1f} s") for phase, sec in res.timings.items()]
    rows.append(("total", f"{res.seconds:.1f} s"))
    w0 = max(len(k) for k, _ in rows)
    w1 = max(len(v) for _, v in rows)
    line = f"+-{'-' * w0}-+-{'-' * w1}-+"
    out = [line, *(f"| {k:<{w0}} | {v:<{w1}} |" for k, v in rows), line]
    if res.label and res.label != res.model_id:
        out.append(f"base model: {res.label}")
    out.append(f"Q: {res.question}")
    out.append(f"A: {res.answer}")
    if res.passed:
        out.append(f"OK: the loss fell by more than half and the answer names {res.name!r}.")
    else:
        why = []
        if not res.loss_halved:
            why.append("the loss did not fall by half")
        if not res.name_in_answer:
            why.append(f"the answer does not contain {res.name!r}")
        out.append("NOT LEARNED: " + " and ".join(why) + " (try more --steps).")
    out.append("This is a toy model trained for seconds: it memorised an identity, nothing more.")
    return "\n".join(out)


def _local_model(cfg: QuickstartConfig) -> Any:
    import tempfile

    from twinkle.model import TransformersModel

    out = cfg.output_dir or tempfile.mkdtemp(prefix="twinkle-quickstart-")
    return TransformersModel(cfg.model_id, seed=cfg.seed, output_dir=out)


def _progress(total: int, desc: str, enabled: bool, file: TextIO | None) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=file or sys.stderr, mininterval=0.2, dynamic_ncols=True)

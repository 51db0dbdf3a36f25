"""The mock language model: a frozen random base with LoRA deltas and hand-written backward passes (numpy).

Per position t, with x_t the (frozen) embedding of token t:

    u_t  = [x_t, x_{t-1}, x_{t-2}, k_1·c_t(λ_1), ..., k_m·c_t(λ_m)]       c_t(λ) = λ·c_{t-1}(λ) + x_t
    h1_t = tanh(ctx_proj(u_t))                                           (attention-like context mixer)
    h2_t = h1_t + tanh(mlp_proj(h1_t))                                   (MLP block with a residual)
    z_t  = lm_head(h2_t) + b                                             (b: frozen byte-frequency prior)

Each projection is ``X·W + s·(drop(X)·A)·B`` where W is frozen and A (in×r), B (r×out) belong to one LoRA
adapter (s = alpha / r). The features u depend on nothing trainable, so they are computed once per sequence.
Everything is float64 so that finite-difference gradient checks and exact resumes hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODULES: tuple[str, ...] = ("ctx_proj", "mlp_proj", "lm_head")

# Text used only to give the frozen output bias a byte-frequency prior, so an untrained model babbles in
# letters and spaces rather than in control bytes.
_PRIOR_TEXT = (
    "The quick brown fox jumps over the lazy dog. Twinkle trains small adapters on a shared base model, "
    "one notebook at a time. Each user sends batches of tokens, gets back the loss and log probabilities, "
    "and takes an optimizer step when ready. When training is done, the adapter is saved to disk and can be "
    "loaded again to continue exactly where it left off, or sampled to see what the model has learned. "
    "Hello! Who are you? I am a helpful assistant. What is two plus two? It is four. Thank you, goodbye.\n"
)


@dataclass(frozen=True)
class MockSpec:
    """Sizes of the mock model. ``seed`` fixes the frozen base weights."""

    vocab_size: int = 260
    embed_dim: int = 32
    hidden_dim: int = 128
    decays: tuple[float, ...] = (0.5, 0.8, 0.95)
    max_length: int = 1024
    seed: int = 0

    @property
    def feature_dim(self) -> int:
        return self.embed_dim * (3 + len(self.decays))

    def module_shape(self, name: str) -> tuple[int, int]:
        """(in_features, out_features) of a projection."""
        return {
            "ctx_proj": (self.feature_dim, self.hidden_dim),
            "mlp_proj": (self.hidden_dim, self.hidden_dim),
            "lm_head": (self.hidden_dim, self.vocab_size),
        }[name]


@dataclass
class LoraWeights:
    """One adapter's trainable tensors: ``params[module] = (A, B)``; A is (in, r), B is (r, out)."""

    scale: float
    params: dict[str, tuple[np.ndarray, np.ndarray]]
    dropout: float = 0.0

    def flat(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for m, (a, b) in self.params.items():
            out[f"{m}.A"] = a
            out[f"{m}.B"] = b
        return out


@dataclass
class _Cache:
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # module -> X
    dropped: dict[str, np.ndarray] = field(default_factory=dict)  # module -> drop(X) (or X)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # module -> dropout mask (scaled)
    xa: dict[str, np.ndarray] = field(default_factory=dict)  # module -> drop(X)·A
    h1: np.ndarray | None = None
    t2: np.ndarray | None = None  # tanh(mlp_proj(h1))


class BaseNet:
    """The frozen base. ``forward``/``backward`` run over a flat (n_tokens, feature_dim) matrix of features."""

    def __init__(self, spec: MockSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, 0x7A11]))
        d, h, v = spec.embed_dim, spec.hidden_dim, spec.vocab_size
        self.embed = rng.standard_normal((v, d))
        self.decays = np.asarray(spec.decays, dtype=np.float64)
        self.decay_norm = np.sqrt(1.0 - self.decays**2)
        self.weights = {
            "ctx_proj": rng.standard_normal(spec.module_shape("ctx_proj")) * (1.5 / np.sqrt(spec.feature_dim)),
            "mlp_proj": rng.standard_normal(spec.module_shape("mlp_proj")) * (1.0 / np.sqrt(h)),
            "lm_head": rng.standard_normal(spec.module_shape("lm_head")) * (1.0 / np.sqrt(h)),
        }
        counts = np.ones(v)
        for byte in _PRIOR_TEXT.encode("utf-8"):
            counts[byte] += 1.0
        prior = np.log(counts / counts.sum())
        self.bias = prior - prior.mean()

    @property
    def num_parameters(self) -> int:
        return int(self.embed.size + sum(w.size for w in self.weights.values()) + self.bias.size)

    # -- features ----------------------------------------------------------------------------------------
    def features(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """Per sequence, the (T, feature_dim) features u_t (vectorised over sequences, looped over time)."""
        if not seqs:
            return []
        lengths = [len(s) for s in seqs]
        t_max = max(lengths)
        d = self.spec.embed_dim
        tok = np.zeros((len(seqs), t_max), dtype=np.int64)
        for i, s in enumerate(seqs):
            tok[i, : len(s)] = s
        x = self.embed[tok]  # (B, T, d)
        prev1 = np.zeros_like(x)
        prev1[:, 1:] = x[:, :-1]
        prev2 = np.zeros_like(x)
        prev2[:, 2:] = x[:, :-2]
        sums = np.empty((len(seqs), t_max, len(self.decays), d))
        c = np.zeros((len(seqs), len(self.decays), d))
        lam = self.decays[None, :, None]
        for t in range(t_max):
            c = lam * c + x[:, t, None, :]
            sums[:, t] = c
        sums = sums * self.decay_norm[None, None, :, None]
        u = np.concatenate([x, prev1, prev2, sums.reshape(len(seqs), t_max, -1)], axis=-1)
        return [u[i, :n] for i, n in enumerate(lengths)]

    def init_state(self, n: int) -> dict[str, np.ndarray]:
        d = self.spec.embed_dim
        return {"x1": np.zeros((n, d)), "x2": np.zeros((n, d)), "c": np.zeros((n, len(self.decays), d))}

    def step_features(self, state: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
        """Advance an incremental state by one token per row; returns that position's features (n, F)."""
        x = self.embed[tokens]
        c = self.decays[None, :, None] * state["c"] + x[:, None, :]
        u = np.concatenate([x, state["x1"], state["x2"], (c * self.decay_norm[None, :, None]).reshape(len(x), -1)], -1)
        state["x2"], state["x1"], state["c"] = state["x1"], x, c
        return u

    # -- projections -------------------------------------------------------------------------------------
    def _linear(self, name: str, x: np.ndarray, lora: LoraWeights | None, cache: _Cache | None,
                rng: np.random.Generator | None) -> np.ndarray:
        y = x @ self.weights[name]
        if lora is not None and name in lora.params:
            a, b = lora.params[name]
            xd = x
            if rng is not None and lora.dropout > 0.0:
                mask = (rng.random(x.shape) >= lora.dropout) / (1.0 - lora.dropout)
                xd = x * mask
                if cache is not None:
                    cache.masks[name] = mask
            xa = xd @ a
            y = y + lora.scale * (xa @ b)
            if cache is not None:
                cache.dropped[name] = xd
                cache.xa[name] = xa
        if cache is not None:
            cache.inputs[name] = x
        return y

    def forward(self, u: np.ndarray, lora: LoraWeights | None, *, cache: _Cache | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
        """Logits (n, V) for features ``u`` (n, F). ``rng`` enables LoRA dropout (training only)."""
        h1 = np.tanh(self._linear("ctx_proj", u, lora, cache, rng))
        t2 = np.tanh(self._linear("mlp_proj", h1, lora, cache, rng))
        h2 = h1 + t2
        if cache is not None:
            cache.h1, cache.t2 = h1, t2
        return self._linear("lm_head", h2, lora, cache, None if rng is None else rng) + self.bias

    def _linear_back(self, name: str, dy: np.ndarray, lora: LoraWeights | None, cache: _Cache,
                     grads: dict[str, np.ndarray], need_dx: bool = True) -> np.ndarray | None:
        dx = dy @ self.weights[name].T if need_dx else None
        if lora is not None and name in lora.params:
            a, b = lora.params[name]
            grads[f"{name}.B"] = lora.scale * (cache.xa[name].T @ dy)
            dxa = lora.scale * (dy @ b.T)
            grads[f"{name}.A"] = cache.dropped[name].T @ dxa
            if need_dx:
                back = dxa @ a.T
                if name in cache.masks:
                    back = back * cache.masks[name]
                dx = dx + back
        return dx

    def backward(self, cache: _Cache, dlogits: np.ndarray, lora: LoraWeights) -> dict[str, np.ndarray]:
        """Gradients of the adapter's tensors (keys ``module.A`` / ``module.B``) given dLoss/dlogits."""
        grads: dict[str, np.ndarray] = {}
        assert cache.h1 is not None and cache.t2 is not None  # set by forward
        dh2 = self._linear_back("lm_head", dlogits, lora, cache, grads)
        assert dh2 is not None  # need_dx
        dz2 = dh2 * (1.0 - cache.t2**2)
        dh1 = dh2 + self._linear_back("mlp_proj", dz2, lora, cache, grads)
        dz1 = dh1 * (1.0 - cache.h1**2)
        self._linear_back("ctx_proj", dz1, lora, cache, grads, need_dx=False)
        return grads


def new_cache() -> _Cache:
    return _Cache()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

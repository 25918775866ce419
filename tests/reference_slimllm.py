"""A deliberately literal, in-memory SlimLLM reference, written from docs/method.md for tests only.

The streaming engine (`streamprune`) never materialises per-token quantities after a layer's forward:
it scores heads from the covariance of the attention output, fits the regression from running sums,
and does the greedy search with closed-form swap updates. This module does the opposite on purpose,
so the two can only agree if the engine's algebra is right:

- per head, the contribution Y_h = A_h W_o,h^T is an explicit (N x C) tensor, A_h coming from an
  attention written out by hand (projections, rotary, causal softmax) rather than from transformers;
- sim(S) is recomputed from scratch over the N tokens (torch.corrcoef) for every candidate set;
- the greedy search tries every swap by rebuilding Y_S from the head tensors;
- the FFN PCA is torch.linalg.eigh of the explicit covariance of the (N x C) FFN output;
- the regression fits y_c = a_c x_c + b_c per output dim from the actual token rows.

Everything runs in float64. It is slow (fine for tiny test models) and holds the whole model in memory.

Conventions shared with the engine, so the outputs are comparable (none of them is a formula):
units and buckets of the GQA modes, tie-breaking of sorts, the greedy visiting order, a dim whose
Pearson correlation is undefined counts 0, the --no-feature-space ablation scores I_down with the
plain norm of the down vector, and a sub-layer that loses nothing is left untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

LAYER = "model.layers.{}."


@dataclass(frozen=True)
class RefPlan:
    """What one layer loses: `prune_units_per_bucket` attention units per bucket, `prune_channels` FFN channels."""

    prune_units_per_bucket: int
    prune_channels: int


@dataclass(frozen=True)
class RefSwitches:
    """The method parts the ablations switch off (docs/method.md "The paper's figures")."""

    greedy: bool = True
    feature_space: bool = True
    regression: bool = True
    recovery: str = "lstsq"  # "lstsq" (docs/method.md "Least-squares recovery") or "affine" (the paper's)
    damping: float = 0.1  # the least-squares ridge, relative to the mean diagonal of the kept inputs' covariance


@dataclass
class RefLayerInfo:
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    sim_initial: float | None = None
    sim_final: float | None = None
    # Regression coefficients (a, b) per sub-layer, when it was fitted; handy when debugging a mismatch.
    o_fit: tuple[torch.Tensor, torch.Tensor] | None = None
    down_fit: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class RefResult:
    tensors: dict[str, torch.Tensor]  # every decoder-layer tensor of the pruned model, HF names, float64
    layers: list[RefLayerInfo] = field(default_factory=list)
    # Input of each layer during pruning (index l = input of layer l, last = output of the last layer).
    hidden: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Attention units (which heads go together, and which may be swapped for one another)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Units:
    heads: list[list[int]]  # query heads of each unit
    kv_heads: list[list[int]]  # KV heads removed together with each unit
    bucket: list[int]  # bucket of each unit: every bucket loses the same number of units


def _units(num_heads: int, num_kv: int, gqa_mode: str) -> _Units:
    rep = num_heads // num_kv
    if num_kv == num_heads:  # MHA: one head with its own q, k, v rows and o columns
        return _Units([[h] for h in range(num_heads)], [[h] for h in range(num_heads)], [0] * num_heads)
    if gqa_mode == "groups":  # a whole KV group: its query heads and its k/v head
        return _Units([list(range(g * rep, (g + 1) * rep)) for g in range(num_kv)],
                      [[g] for g in range(num_kv)], [0] * num_kv)
    if gqa_mode == "heads":  # one query head; each KV group (query heads g*rep .. g*rep+rep-1) is a bucket
        return _Units([[h] for h in range(num_heads)], [[] for _ in range(num_heads)],
                      [h // rep for h in range(num_heads)])
    raise ValueError(f"unknown gqa_mode {gqa_mode!r}")


# ----------------------------------------------------------------------------------------------
# Literal forward pieces
# ----------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """x / rms(x) * weight in float64 (transformers' RMSNorm rounds through float32)."""
    return norm.weight * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + norm.variance_epsilon)


def rotary_tables(rotary, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, T, d) in float64 from the model's own inverse frequencies (transformers forms them in
    float32); the frequencies themselves are the model's definition, so they are taken as given."""
    freqs = torch.arange(t, dtype=torch.float64)[:, None] * rotary.inv_freq.double()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


def _linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    y = x @ module.weight.T
    return y if module.bias is None else y + module.bias


def head_outputs(layer, xn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head attention output A (n, T, H, d): the input of o_proj, head by head.

    Written out (rotary, causal softmax per sample, query head h reading KV head h // rep) so it does
    not share the attention kernels the engine runs.
    """
    attn = layer.self_attn
    n, t, _ = xn.shape
    d = attn.head_dim
    q = _linear(xn, attn.q_proj).view(n, t, -1, d)
    k = _linear(xn, attn.k_proj).view(n, t, -1, d)
    v = _linear(xn, attn.v_proj).view(n, t, -1, d)
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each query / key head, before the rotary embedding
        q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
    rep = q.shape[2] // k.shape[2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (1, T, 1, d): same positions for every sample
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    out = torch.empty_like(q)
    for h in range(q.shape[2]):
        g = h // rep
        logits = q[:, :, h] @ k[:, :, g].transpose(1, 2) / d**0.5  # (n, T, T)
        logits = logits.masked_fill(future, float("-inf"))
        out[:, :, h] = torch.softmax(logits, dim=-1) @ v[:, :, g]
    return out


def _ffn_inner(mlp, x: torch.Tensor) -> torch.Tensor:
    """Z = act(x W_gate^T) * (x W_up^T), all channels."""
    return mlp.act_fn(_linear(x, mlp.gate_proj)) * _linear(x, mlp.up_proj)


# ----------------------------------------------------------------------------------------------
# Head scoring: Pearson similarity and greedy search
# ----------------------------------------------------------------------------------------------


def pearson_similarity(y_s: torch.Tensor, y: torch.Tensor) -> float:
    """sim = sum over output dims c of |pearson over tokens (y_s[:, c], y[:, c])|; (N x C) inputs.

    One torch.corrcoef over all 2C columns (rows of its input are variables), of which the (c, C + c)
    entries pair Y_S[:, c] with Y[:, c]. A dim whose correlation is undefined (a constant column)
    contributes 0.
    """
    c_dim = y.shape[1]
    r = torch.corrcoef(torch.cat([y_s.T, y.T]))
    pairs = r[torch.arange(c_dim), c_dim + torch.arange(c_dim)]
    return float(torch.nan_to_num(pairs, nan=0.0).abs().sum())


def _sim_of(unit_out: list[torch.Tensor], keep: list[bool], y: torch.Tensor) -> float:
    y_s = sum((u for u, k in zip(unit_out, keep, strict=True) if k), torch.zeros_like(y))
    return pearson_similarity(y_s, y)


def select_units(unit_out: list[torch.Tensor], buckets: list[int], prune_per_bucket: int,
                 greedy: bool) -> tuple[list[bool], float, float]:
    """Kept-unit mask from single scores and (optionally) the greedy swap search; also sim before/after."""
    y = sum(unit_out[1:], unit_out[0].clone())
    n_units = len(unit_out)
    # Single score: similarity of the output without unit u; highest = least missed = pruned first.
    scores = [_sim_of(unit_out, [v != u for v in range(n_units)], y) for u in range(n_units)]
    keep = [True] * n_units
    for b in sorted(set(buckets)):
        members = [u for u in range(n_units) if buckets[u] == b]
        # Descending by score; Python's sort is stable, so equal scores keep index order.
        order = sorted(members, key=lambda u: -scores[u])
        for u in order[:prune_per_bucket]:
            keep[u] = False
    sim_initial = current = _sim_of(unit_out, keep, y)
    if greedy:
        for p in [u for u in range(n_units) if not keep[u]]:
            best_sim, best_k = current, None
            for k in range(n_units):
                if not keep[k] or buckets[k] != buckets[p]:
                    continue
                trial = list(keep)
                trial[p], trial[k] = True, False
                s = _sim_of(unit_out, trial, y)
                if s > best_sim:  # strict: the first of equal best candidates wins, no-op swaps never
                    best_sim, best_k = s, k
            if best_k is not None:
                keep[p], keep[best_k] = True, False
                current = best_sim
    return keep, sim_initial, current


# ----------------------------------------------------------------------------------------------
# Channel scoring
# ----------------------------------------------------------------------------------------------


def channel_scores(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, feature_space: bool) -> torch.Tensor:
    """I_gate + I_up + I_down per channel. x: FFN input (N x C), z: act(gate)*up (N x I), y: FFN output (N x C)."""
    n_x = torch.sqrt((x * x).sum(0))  # per-feature L2 norm over all tokens
    i_gate = torch.stack([torch.linalg.norm(w_gate[i] * n_x) for i in range(w_gate.shape[0])])
    i_up = torch.stack([torch.linalg.norm(w_up[i] * n_x) for i in range(w_up.shape[0])])
    u = w_down.T  # row i: channel i's down vector
    if feature_space:
        yc = y - y.mean(0, keepdim=True)
        cov = yc.T @ yc / y.shape[0]  # population covariance (divided by N)
        lam, v = torch.linalg.eigh(cov)
        w = torch.sigmoid(lam.abs() / lam.abs().mean())
        q_norm = torch.stack([torch.linalg.norm((u[i] @ v).abs() * w) for i in range(u.shape[0])])
    else:  # ablation: no eigenbasis, the plain norm of the down vector
        q_norm = torch.linalg.norm(u, dim=1)
    z_norm = torch.stack([torch.linalg.norm(z[:, i]) for i in range(z.shape[1])])
    return i_gate + i_up + z_norm * q_norm


# ----------------------------------------------------------------------------------------------
# Recovery: least squares (the default) and the paper's per-row affine fit
# ----------------------------------------------------------------------------------------------


def regression_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares y_c = a_c x_c + b_c per output dim over the token rows of x, y (N x C)."""
    a = torch.empty(x.shape[1], dtype=x.dtype)
    b = torch.empty(x.shape[1], dtype=x.dtype)
    for c in range(x.shape[1]):
        xc, yc = x[:, c], y[:, c]
        dx, dy = xc - xc.mean(), yc - yc.mean()
        var = (dx * dx).mean()
        if var == 0:  # docs/method.md "Affine recovery" guard: no slope can be fitted, shift the mean only
            a[c], b[c] = 1.0, yc.mean() - xc.mean()
        else:
            a[c] = (dx * dy).mean() / var
            b[c] = yc.mean() - a[c] * xc.mean()
    return a, b


def least_squares_fit(x: torch.Tensor, t: torch.Tensor, kept: torch.Tensor, w_kept: torch.Tensor,
                      damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') minimising sum over tokens ||t - W' x_K - b'||^2 + lambda N ||W' - W[:, K]||^2, literally: one
    float64 `torch.linalg.lstsq` over the token rows [x_K, 1] -> t plus the ridge as |K| extra rows
    sqrt(lambda N) [I, 0] -> sqrt(lambda N) W[:, K]^T (the intercept undamped). lambda = damping times the
    mean population variance of the kept inputs."""
    x_k = x[:, kept]
    n, k = x_k.shape
    lam = damping * float(((x_k - x_k.mean(0)) ** 2).mean(0).mean())
    root = (lam * n) ** 0.5
    design = torch.cat([torch.cat([x_k, torch.ones(n, 1, dtype=x.dtype)], 1),
                        torch.cat([root * torch.eye(k, dtype=x.dtype), torch.zeros(k, 1, dtype=x.dtype)], 1)])
    target = torch.cat([t, root * w_kept.T])
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution  # (|K| + 1, out)
    return solution[:k].T.contiguous(), solution[k].clone()


def _recovered(weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor):
    """W'[c, :] = a_c W[c, kept]; the new bias also absorbs the sub-layer's own bias (a_c bias_c + b_c),
    because the fitted x included it."""
    return weight * a[:, None], b if bias is None else a * bias + b


# ----------------------------------------------------------------------------------------------
# The whole model
# ----------------------------------------------------------------------------------------------


def layer_cosines(hidden: Sequence[torch.Tensor]) -> list[float]:
    """docs/method.md "Layer ratios": s_l = mean over tokens of cos(x_l, y_l), from the per-layer inputs of a dense
    run (`RefResult.hidden` with all-zero plans)."""
    return [float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
            for x, y in zip(hidden[:-1], hidden[1:], strict=True)]


@torch.no_grad()
def reference_prune(model, ids: torch.Tensor, plans: Sequence[RefPlan], gqa_mode: str = "heads",
                    switches: RefSwitches = RefSwitches()) -> RefResult:
    """Prune a float64 HF Llama/Mistral/Qwen2 causal LM (not modified) layer by layer, sequentially."""
    inner = model.model
    if inner.embed_tokens.weight.dtype != torch.float64:
        raise ValueError("the reference runs in float64; load the model with dtype=torch.float64")
    h = inner.embed_tokens.weight[ids]  # (n, T, C)
    cos, sin = rotary_tables(inner.rotary_emb, ids.shape[1])
    result = RefResult(tensors={}, hidden=[h.clone()])
    for i, layer in enumerate(inner.layers):
        h, info = _prune_layer(layer, LAYER.format(i), h, cos, sin, plans[i], gqa_mode, switches, result.tensors)
        result.layers.append(info)
        result.hidden.append(h.clone())
    return result


def _prune_layer(layer, prefix: str, x_in: torch.Tensor, cos, sin, plan: RefPlan, gqa_mode: str,
                 switches: RefSwitches, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, RefLayerInfo]:
    n, t, c_dim = x_in.shape
    attn, mlp = layer.self_attn, layer.mlp
    d = attn.head_dim
    norms = [n for n, _ in layer.named_parameters() if "norm" in n]  # Qwen3's q_norm / k_norm too
    for name in norms:
        out[prefix + name] = layer.get_parameter(name).clone()

    # ---- attention (docs/method.md "Head scoring", then "Affine recovery" for o_proj) ----
    a_heads = head_outputs(layer, rms_norm(layer.input_layernorm, x_in), cos, sin).reshape(n * t, -1, d)
    n_heads = a_heads.shape[1]
    n_kv = attn.k_proj.weight.shape[0] // d
    w_o = attn.o_proj.weight
    b_o = attn.o_proj.bias
    # a_heads: (N, H, d). Y_h = A_h W_o,h^T: head h's contribution to the o_proj output, (N x C) each.
    y_heads = [a_heads[:, hd] @ w_o[:, hd * d:(hd + 1) * d].T for hd in range(n_heads)]
    units = _units(n_heads, n_kv, gqa_mode)
    unit_out = [sum(y_heads[hd] for hd in heads) for heads in units.heads]
    keep = [True] * len(unit_out)
    info = RefLayerInfo([], [], [])
    if plan.prune_units_per_bucket > 0:
        keep, info.sim_initial, info.sim_final = select_units(unit_out, units.bucket, plan.prune_units_per_bucket,
                                                              switches.greedy)
    kept_heads = sorted(hd for u, k in enumerate(keep) if k for hd in units.heads[u])
    removed_kv = {g for u, k in enumerate(keep) if not k for g in units.kv_heads[u]}
    kept_kv = [g for g in range(n_kv) if g not in removed_kv]
    cols = torch.tensor([hd * d + j for hd in kept_heads for j in range(d)], dtype=torch.long)
    kv_rows = torch.tensor([g * d + j for g in kept_kv for j in range(d)], dtype=torch.long)
    y_dense = sum(y_heads[1:], y_heads[0].clone())
    x_pruned = sum((y_heads[hd] for hd in kept_heads), torch.zeros_like(y_dense))
    if b_o is not None:
        y_dense, x_pruned = y_dense + b_o, x_pruned + b_o
    new_w_o, new_b_o = w_o[:, cols], b_o
    attn_out = x_pruned
    if plan.prune_units_per_bucket > 0 and switches.regression and switches.recovery == "lstsq":
        a_all = a_heads.reshape(n * t, -1)  # o_proj's input, every head
        new_w_o, new_b_o = least_squares_fit(a_all, y_dense, cols, w_o[:, cols], switches.damping)
        attn_out = a_all[:, cols] @ new_w_o.T + new_b_o
    elif plan.prune_units_per_bucket > 0 and switches.regression:
        a, b = regression_fit(x_pruned, y_dense)
        info.o_fit = (a, b)
        new_w_o, new_b_o = _recovered(new_w_o, b_o, a, b)
        attn_out = a * x_pruned + b
    for p, rows in (("q_proj", cols), ("k_proj", kv_rows), ("v_proj", kv_rows)):
        proj = attn.get_submodule(p)
        out[prefix + f"self_attn.{p}.weight"] = proj.weight[rows].clone()
        if proj.bias is not None:
            out[prefix + f"self_attn.{p}.bias"] = proj.bias[rows].clone()
    out[prefix + "self_attn.o_proj.weight"] = new_w_o.clone()
    if new_b_o is not None:
        out[prefix + "self_attn.o_proj.bias"] = new_b_o.clone()
    h = x_in + attn_out.reshape(n, t, c_dim)  # "Calibration propagation": the FFN sees the pruned, recovered attention

    # ---- FFN (docs/method.md "Channel scoring", then "Affine recovery" for down_proj) ----
    x = rms_norm(layer.post_attention_layernorm, h).reshape(n * t, c_dim)  # FFN input over all N tokens
    z = _ffn_inner(mlp, x)
    w_down, b_down = mlp.down_proj.weight, mlp.down_proj.bias
    y_ffn = z @ w_down.T + (0 if b_down is None else b_down)
    n_ch = z.shape[1]
    kept_ch = list(range(n_ch))
    if plan.prune_channels > 0:
        scores = channel_scores(x, z, y_ffn, mlp.gate_proj.weight, mlp.up_proj.weight, w_down,
                                switches.feature_space)
        # Ascending, stable (ties by index): the lowest `prune_channels` go.
        order = sorted(range(n_ch), key=lambda i: float(scores[i]))
        pruned = set(order[:plan.prune_channels])
        kept_ch = [i for i in range(n_ch) if i not in pruned]
    ch = torch.tensor(kept_ch, dtype=torch.long)
    x_ffn = z[:, ch] @ w_down[:, ch].T + (0 if b_down is None else b_down)
    new_w_down, new_b_down = w_down[:, ch], b_down
    ffn_out = x_ffn
    if plan.prune_channels > 0 and switches.regression and switches.recovery == "lstsq":
        new_w_down, new_b_down = least_squares_fit(z, y_ffn, ch, w_down[:, ch], switches.damping)
        ffn_out = z[:, ch] @ new_w_down.T + new_b_down
    elif plan.prune_channels > 0 and switches.regression:
        a, b = regression_fit(x_ffn, y_ffn)
        info.down_fit = (a, b)
        new_w_down, new_b_down = _recovered(new_w_down, b_down, a, b)
        ffn_out = a * x_ffn + b
    for p in ("gate_proj", "up_proj"):
        proj = mlp.get_submodule(p)
        out[prefix + f"mlp.{p}.weight"] = proj.weight[ch].clone()
        if proj.bias is not None:
            out[prefix + f"mlp.{p}.bias"] = proj.bias[ch].clone()
    out[prefix + "mlp.down_proj.weight"] = new_w_down.clone()
    if new_b_down is not None:
        out[prefix + "mlp.down_proj.bias"] = new_b_down.clone()
    info.kept_heads, info.kept_kv_heads, info.kept_channels = kept_heads, kept_kv, kept_ch
    return h + ffn_out.reshape(n, t, c_dim), info

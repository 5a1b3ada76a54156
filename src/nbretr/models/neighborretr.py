"""The NeighborRetr model (docs/method.md): CLIP encoders, temporal transformer, WTI head,
token clustering, and the composition of the four losses of :mod:`nbretr.losses`.

Where each equation lives:

| docs/method.md | code |
|---|---|
| Encoders (text tokens, frame CLS) | :mod:`nbretr.models.clip` (:func:`encode_text_tokens`, :func:`encode_frames`) |
| Encoders (temporal transformer, residual) | :mod:`nbretr.models.temporal` |
| Fine-grained similarity (WTI) | :mod:`nbretr.models.wti` → :func:`nbretr.ops.wti_similarity` |
| Global features, ``g_ij`` | :mod:`nbretr.models.clustering`; :meth:`NeighborRetr.global_similarity` |
| Loss 1 (``c_i``, ``w_i``) | :meth:`NeighborRetr.centrality_weights`; :func:`nbretr.losses.centrality_weighting_loss` |
| Loss 2 (bank centrality) | :meth:`NeighborRetr.bank_centrality`; :func:`nbretr.losses.neighbor_adjusting_loss` |
| Loss 3 | :func:`nbretr.losses.uniform_regularization_loss` → :func:`nbretr.ops.sinkhorn_log` |
| Loss 4 | :func:`nbretr.losses.kl_consistency_loss` |
| total, both directions | :meth:`NeighborRetr.loss` |
| ``logit_scale`` ≤ log(100) | :meth:`NeighborRetr.clamp_logit_scale` |
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from nbretr import losses, ops
from nbretr.memory_bank import MemoryBank
from nbretr.models import clip as clip_mod
from nbretr.models.clustering import GlobalTokenizer
from nbretr.models.distributed import all_gather_with_grad, world_size
from nbretr.models.temporal import TemporalTransformer
from nbretr.models.wti import WTIHead

log = logging.getLogger("nbretr")


@dataclass
class NeighborRetrConfig:
    """Every knob of the model and its losses; defaults are the reference's values (docs/method.md).

    CLIP: ``clip_path`` (a local HF directory or an OpenAI ``.pt``; ``None`` = a random tiny
    CLIP from ``vocab_size``, ``image_size``, ``clip_width``, ``clip_layers``, ``clip_heads``,
    ``patch_size``)."""

    max_words: int = 24
    max_frames: int = 12
    # losses (docs/method.md, "Losses")
    centrality_scale: float = 0.3          # κ
    num_neighbors: int = 20                # k
    temperature: float = 3.0               # τ
    beta: float = 0.7                      # β
    sinkhorn_iters: int = 50
    w_wti: float = 1.0                     # the reference has no weight on L_wti (1); 0 ablates it
    w_opt: float = 1.0
    w_nbi: float = 1.0
    w_kl: float = 1.0
    centrality: Literal["mean", "knn"] = "mean"   # bank centrality of L_nbi
    centrality_k: int | None = None        # k of the k-occurrence ("knn"); None = num_neighbors
    nbi_normalize_over: Literal["complement", "neighbors"] = "complement"
    detach_plan: bool = True
    # The reference lets L_wti's gradient flow into its weights w_i = exp(κ c_i). Since
    # d(-w_i log p_ii)/dc_i = -κ w_i log p_ii > 0 always, that gradient pushes every global
    # token away from the batch's tokens; from a random init this wins and collapses the
    # encoders (measured on the embedded dataset: R@1 at chance). True treats the weights as
    # constants (the paper's reading: weights of the contrastive loss).
    detach_centrality: bool = False
    baseline: bool = False                 # plain symmetric InfoNCE on the same model
    # architecture
    temporal_layers: int = 4
    text_cluster_ratio: float = 1 / 6
    video_cluster_ratio: float = 1 / 4
    cluster_k: int = 3
    cluster_heads: int = 8
    cluster_mlp: bool = True
    max_logit_scale: float = math.log(100.0)
    # CLIP
    clip_path: str | None = None
    vocab_size: int = 49408
    image_size: int = 32
    clip_width: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    patch_size: int = 16
    # memory: recompute the CLIP towers' and the temporal transformer's block activations in
    # the backward pass instead of keeping them (same gradients, less memory, more time)
    grad_checkpointing: bool = False
    # runtime
    backend: ops.Backend | None = None     # nbretr.ops backend for every op call (None = default)
    gather_reduce_grads: bool = False      # see nbretr.models.distributed
    # with gather_reduce_grads False: scale the encoders' gradient as the reference's
    # all-gather does on this many processes (None: the actual world size)
    grad_world_size: int | None = None

    def __post_init__(self):
        if self.centrality not in ("mean", "knn"):
            raise ValueError(f"centrality must be 'mean' or 'knn', got {self.centrality!r}")
        if self.nbi_normalize_over not in ("complement", "neighbors"):
            raise ValueError(f"nbi_normalize_over must be 'complement' or 'neighbors', got {self.nbi_normalize_over!r}")
        if self.grad_world_size is not None:
            if self.grad_world_size < 1:
                raise ValueError(f"grad_world_size must be >= 1, got {self.grad_world_size}")
            if self.gather_reduce_grads:
                raise ValueError("grad_world_size emulates the reference's local-slice gather gradient; "
                                 "it needs gather_reduce_grads=False")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _zero(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_zeros(())


class NeighborRetr(nn.Module):
    """NeighborRetr on a transformers ``CLIPModel`` (``clip_model`` or built from ``config``)."""

    def __init__(self, config: NeighborRetrConfig, clip_model: nn.Module | None = None):
        super().__init__()
        self.config = config
        if clip_model is None:
            if config.clip_path:
                clip_model = clip_mod.load_clip(config.clip_path)
            else:
                clip_model = clip_mod.build_clip(clip_mod.tiny_clip_config(
                    config.vocab_size, config.image_size, width=config.clip_width,
                    layers=config.clip_layers, heads=config.clip_heads, patch_size=config.patch_size))
        self.clip = clip_model
        dim = self.clip.config.projection_dim
        self.dim = dim
        text_cfg = copy.deepcopy(self.clip.config.text_config)
        same_width = text_cfg.hidden_size == dim
        if not same_width:  # e.g. a CLIP whose text width differs from its projection
            text_cfg.hidden_size, text_cfg.intermediate_size = dim, 4 * dim
            text_cfg.num_attention_heads = max(1, dim // 64)
        self.temporal = TemporalTransformer(text_cfg, config.temporal_layers,
                                            max_positions=max(text_cfg.max_position_embeddings, config.max_frames))
        if same_width:
            self.temporal.init_from_clip(self.clip)
        else:
            log.warning("CLIP text width %d != projection %d: temporal transformer initialised randomly",
                        self.clip.config.text_config.hidden_size, dim)
        self.wti = WTIHead(dim, backend=config.backend)
        if not config.baseline:
            kw = dict(k=config.cluster_k, heads=config.cluster_heads, mlp=config.cluster_mlp)
            self.text_cluster = GlobalTokenizer(dim, config.text_cluster_ratio, **kw)
            self.video_cluster = GlobalTokenizer(dim, config.video_cluster_ratio, **kw)
        if config.grad_checkpointing:
            self.set_grad_checkpointing(True)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute the blocks of both CLIP towers and of the temporal transformer during
        the backward pass instead of storing their activations (``torch.utils.checkpoint``,
        non-reentrant, so frozen inputs are fine): the same gradients for less memory and
        about one more forward pass of those blocks. Active in training mode only."""
        clip_mod.set_grad_checkpointing(self.clip, enabled)
        self.temporal.grad_checkpointing = bool(enabled)
        self.config.grad_checkpointing = bool(enabled)

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", tokenizer_path=None, **overrides) -> "NeighborRetr":
        """A model folder written by ``python -m nbretr.export`` (weights-only safetensors,
        config, tokenizer), or a released NeighborRetr ``pytorch_model.bin``; eval mode, on
        ``device``. ``overrides`` set runtime fields (``backend`` ...). The tokenizer:
        :func:`nbretr.pretrained.load_tokenizer`. See :mod:`nbretr.pretrained`."""
        from nbretr.pretrained import load_model
        return load_model(path, device=device, tokenizer_path=tokenizer_path, **overrides)[0]

    # -- CLIP temperature ----------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        """CLIP's learned log-temperature (the parameter; ``exp()`` is the scale)."""
        return self.clip.logit_scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp ``logit_scale`` to ≤ log(100) (call after each optimiser step)."""
        self.clip.logit_scale.clamp_(max=self.config.max_logit_scale)

    # -- encoders ------------------------------------------------------------------------------
    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor):
        """``(T [B, L, D], mask [B, L])``: every token's projected final hidden state."""
        return clip_mod.encode_text_tokens(self.clip, text_ids, text_mask), text_mask

    def encode_video(self, video: torch.Tensor, video_mask: torch.Tensor):
        """``(V [B, F, D], mask [B, F])`` for frames ``[B, F, 3, H, W]``: projected CLS per frame,
        + frame positions, temporal transformer, + input (residual)."""
        B, Fr = video.shape[:2]
        frames = clip_mod.encode_frames(self.clip, video.reshape(B * Fr, *video.shape[2:]))
        frames = frames.view(B, Fr, -1)
        return self.temporal(frames, video_mask), video_mask

    # -- similarities --------------------------------------------------------------------------
    def token_weights_text(self, T: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``a_t [B, L]`` float32 (softmax over valid tokens, 0 on masked)."""
        return self.wti.text_weights(T, mask)

    def token_weights_video(self, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``a_v [B, F]`` float32 (softmax over valid frames, 0 on masked)."""
        return self.wti.video_weights(V, mask)

    def similarity(self, T, t_mask, V, v_mask) -> torch.Tensor:
        """Local (WTI) similarity ``s [Bt, Bv]`` float32, through :func:`nbretr.ops.wti_similarity`."""
        return self.wti(T, t_mask, V, v_mask)

    def global_tokens_text(self, T: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One global token per caption ``[B, D]`` float32 (two rounds of clustering)."""
        self._need_clusters()
        with torch.autocast(T.device.type, enabled=False):
            return self.text_cluster(T.float(), mask)

    def global_tokens_video(self, V: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One global token per video ``[B, D]`` float32 (two rounds of clustering)."""
        self._need_clusters()
        with torch.autocast(V.device.type, enabled=False):
            return self.video_cluster(V.float(), mask)

    @staticmethod
    def global_similarity(g_text: torch.Tensor, g_video: torch.Tensor) -> torch.Tensor:
        """``g [Bt, Bv]`` = dot products of the (un-normalised) global tokens."""
        return g_text.float() @ g_video.float().T

    def centrality_weights(self, tokens: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """``w_i = exp(κ·c_i)``, ``c_i`` = mean over every token x of the batch (valid or not) of
        ``<ĝ_i, x̂>`` (docs/method.md, "Centrality"). tokens ``[B, N, D]``, global ``[B, D]`` → ``[B]``."""
        x_hat = F.normalize(tokens.float().reshape(-1, tokens.shape[-1]), dim=-1)
        g_hat = F.normalize(global_tokens.float(), dim=-1)
        c = g_hat @ x_hat.mean(dim=0)
        if self.config.detach_centrality:
            c = c.detach()
        return torch.exp(self.config.centrality_scale * c)

    def _need_clusters(self):
        if self.config.baseline:
            raise RuntimeError("baseline=True builds no token clustering (global tokens are not used)")

    # -- memory bank ---------------------------------------------------------------------------
    def bank_centrality(self, T, t_mask, V, v_mask, bank: MemoryBank | None, *, copy_bank: bool = False):
        """The gallery centralities of L_nbi from the bank, for both directions.

        Returns ``(t2v, v2t)``; each is a dict of keyword arguments for
        :func:`nbretr.losses.neighbor_adjusting_loss`: ``{"bank_sim": M}`` with
        ``M [B gallery, |bank|]`` (``centrality="mean"``: WTI of batch videos × bank captions for
        t2v and batch captions × bank videos for v2t, with gradient as in the reference), or
        ``{"centrality": c}`` (``"knn"``: the k-occurrence frequency N_k(j)/|bank| of each batch
        gallery item among the bank queries' top-k, from :func:`nbretr.ops.topk_centrality`).

        The bank's buffers are read without a copy (``bank.fields()``) and autograd keeps them
        for the weight MLPs' backward: push into the bank only AFTER ``backward()``, or pass
        ``copy_bank=True`` (what ``forward(update_bank=True)`` does)."""
        if bank is None or len(bank) == 0:
            return {"bank_sim": None}, {"bank_sim": None}
        f = bank.view() if copy_bank else bank.fields()
        bt, btm = f["text"].to(T.device), f["text_mask"].to(T.device)
        bv, bvm = f["video"].to(V.device), f["video_mask"].to(V.device)
        if self.config.centrality == "mean":
            m_t2v = self.wti(bt, btm, V, v_mask).T        # [B videos, |bank| captions]
            m_v2t = self.wti(T, t_mask, bv, bvm)          # [B captions, |bank| videos]
            return {"bank_sim": m_t2v}, {"bank_sim": m_v2t}
        k = min(self.config.centrality_k or self.config.num_neighbors, T.shape[0])
        with torch.no_grad():
            bank_t, batch_v = self.wti.token_triples(bt, btm, V, v_mask)
            batch_t, bank_v = self.wti.token_triples(T, t_mask, bv, bvm)
            be = self.config.backend
            c_v = ops.topk_centrality(bank_t, batch_v, k, sim="wti", q_role="text", backend=be)[2]
            c_t = ops.topk_centrality(bank_v, batch_t, k, sim="wti", q_role="video", backend=be)[2]
        n = len(bank)
        return ({"bank_sim": None, "centrality": c_v.float() / n},
                {"bank_sim": None, "centrality": c_t.float() / n})

    # -- losses --------------------------------------------------------------------------------
    def loss(self, T: torch.Tensor, t_mask: torch.Tensor, V: torch.Tensor, v_mask: torch.Tensor,
             bank: MemoryBank | None = None, *, copy_bank: bool = False) -> dict:
        """Total loss and its parts on the (all-gathered) batch features T ``[B, L, D]``,
        V ``[B, F, D]`` (row i of T matches row i of V). float32 throughout.

        Returns ``{"loss": total (scalar, with grad), "wti", "nbi", "opt", "kl": detached
        scalars (the loss parts L_wti, L_nbi, L_opt, L_kl of docs/method.md; "opt" is the
        uniform regularisation's optimal-transport loss, not the optimizer), "logit_scale":
        exp(logit_scale)}``. ``baseline=True``: "loss" = "wti" =
        symmetric InfoNCE on ``logit_scale·s``, the others 0."""
        c = self.config
        if T.shape[0] != V.shape[0]:
            raise ValueError(f"T and V must have the same batch size, got {T.shape[0]} and {V.shape[0]}")
        with torch.autocast(T.device.type, enabled=False):
            T, V = T.float(), V.float()  # everything after the encoders runs in float32
            s = self.similarity(T, t_mask, V, v_mask)
            scale = self.clip.logit_scale.float().exp()
            if c.baseline:
                l_wti = (losses.infonce_loss(scale * s) + losses.infonce_loss(scale * s.T)) / 2
                l_nbi = l_opt = l_kl = _zero(s)
            else:
                g_t = self.global_tokens_text(T, t_mask)
                g_v = self.global_tokens_video(V, v_mask)
                g = self.global_similarity(g_t, g_v)
                w_t = self.centrality_weights(T, g_t)
                w_v = self.centrality_weights(V, g_v)
                l_wti = (losses.centrality_weighting_loss(scale * s, w_t)
                         + losses.centrality_weighting_loss(scale * s.T, w_v)) / 2
                l_opt = l_kl = l_nbi = _zero(s)
                if c.w_opt:
                    kw = dict(temperature=c.temperature, beta=c.beta, n_iters=c.sinkhorn_iters,
                              detach_plan=c.detach_plan, backend=c.backend)
                    l_opt = (losses.uniform_regularization_loss(g, **kw)
                             + losses.uniform_regularization_loss(g.T, **kw)) / 2
                if c.w_kl:
                    l_kl = (losses.kl_consistency_loss(g, s) + losses.kl_consistency_loss(g.T, s.T)) / 2
                if c.w_nbi:
                    t2v, v2t = self.bank_centrality(T, t_mask, V, v_mask, bank, copy_bank=copy_bank)
                    kw = dict(num_neighbors=c.num_neighbors, temperature=c.temperature,
                              normalize_over=c.nbi_normalize_over)
                    l_nbi = (losses.neighbor_adjusting_loss(s, **t2v, **kw)
                             + losses.neighbor_adjusting_loss(s.T, **v2t, **kw)) / 2
            total = (l_wti if c.baseline else c.w_wti * l_wti) + c.w_opt * l_opt + c.w_nbi * l_nbi + c.w_kl * l_kl
        return {"loss": total, "wti": l_wti.detach(), "nbi": l_nbi.detach(), "opt": l_opt.detach(),
                "kl": l_kl.detach(), "logit_scale": scale.detach()}

    def forward(self, batch: Mapping[str, torch.Tensor], bank: MemoryBank | None = None, *,
                update_bank: bool = False) -> dict:
        """Encode a batch (dict as from :func:`nbretr.data.collate`), all-gather across ranks with
        gradient, and return :meth:`loss` plus ``"bank_items"``: the gathered, detached features
        ``{text, text_mask, video, video_mask, ids}`` to push into the memory bank after the
        step (``update_bank=True`` pushes them into ``bank`` here, after the loss, as the
        reference does, and then reads the bank through a copy so the push cannot invalidate
        the backward; the default leaves the push to the caller, who must do it after
        ``backward()``: the loss holds the bank's buffers without a copy)."""
        T, tm = self.encode_text(batch["text_ids"], batch["text_mask"])
        V, vm = self.encode_video(batch["video"], batch["video_mask"])
        red = self.config.gather_reduce_grads
        scale = 1.0
        if self.config.grad_world_size is not None and not red:
            scale = world_size() / self.config.grad_world_size
        T = all_gather_with_grad(T, reduce_grads=red, grad_scale=scale)
        V = all_gather_with_grad(V, reduce_grads=red, grad_scale=scale)
        tm, vm = all_gather_with_grad(tm), all_gather_with_grad(vm)
        ids = batch.get("index")
        if ids is None:
            ids = torch.arange(batch["text_ids"].shape[0], device=T.device)
        ids = all_gather_with_grad(torch.as_tensor(ids, device=T.device).long())
        out = self.loss(T, tm, V, vm, bank, copy_bank=update_bank)
        out["bank_items"] = {"text": T.detach(), "text_mask": tm, "video": V.detach(),
                             "video_mask": vm, "ids": ids}
        if update_bank and bank is not None:
            bank.push(out["bank_items"])
        return out

    @torch.no_grad()
    def encode_for_bank(self, batch: Mapping[str, torch.Tensor]) -> dict:
        """The bank entries of a batch, encoded without gradient (the start-of-epoch refill);
        all-gathered across ranks."""
        T, tm = self.encode_text(batch["text_ids"], batch["text_mask"])
        V, vm = self.encode_video(batch["video"], batch["video_mask"])
        ids = batch.get("index")
        if ids is None:
            ids = torch.arange(T.shape[0], device=T.device)
        g = all_gather_with_grad
        return {"text": g(T), "text_mask": g(tm), "video": g(V), "video_mask": g(vm),
                "ids": g(torch.as_tensor(ids, device=T.device).long())}

"""nbretr.models: CLIP loading (HF directory, OpenAI .pt state dict and TorchScript), the
temporal transformer, WTI head, token clustering, the full NeighborRetr forward/backward
(both centralities, baseline, autocast), and ext-vs-torch agreement once the ops land."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import nbretr
from nbretr import MemoryBank, ops
from nbretr.models import NeighborRetr, NeighborRetrConfig, all_gather_with_grad, load_clip, tiny_clip_config
from nbretr.models import clip as clip_mod
from nbretr.models.clustering import GlobalTokenizer, dpc_knn
from nbretr.models.wti import WTIHead
from helpers import require_ext

VOCAB = 50
SMALL = dict(vocab_size=VOCAB, image_size=32, clip_width=32, clip_layers=2, clip_heads=2,
             patch_size=16, temporal_layers=2, max_words=12, max_frames=6)


def require_ext_ops(*names: str) -> None:
    require_ext("cpu")
    missing = [n for n in names if not hasattr(torch.ops.nbretr, n)]
    assert not missing, f"the extension has no ops {missing}"  # a typo here must not skip silently


def make_batch(B, L=12, F=6, image=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    lengths = torch.randint(2, L + 1, (B,), generator=g)
    tmask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = ids * tmask
    nf = torch.randint(1, F + 1, (B,), generator=g)
    vmask = (torch.arange(F)[None] < nf[:, None]).long()
    video = torch.randn(B, F, 3, image, image, generator=g) * vmask[:, :, None, None, None]
    return dict(text_ids=ids, text_mask=tmask, video=video, video_mask=vmask, index=torch.arange(B))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return NeighborRetr(NeighborRetrConfig(**SMALL)).eval()


# --- CLIP ---------------------------------------------------------------------------------------
def tiny_hf_clip(seed=0):
    torch.manual_seed(seed)
    cfg = tiny_clip_config(VOCAB, 32, width=64, layers=2, heads=1, patch_size=16, context_length=16,
                           projection_dim=48)
    return clip_mod.build_clip(cfg).eval()


def features(clip, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    img = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        return clip_mod.encode_text_tokens(clip, ids, mask), clip_mod.encode_frames(clip, img)


def test_encoders_shapes():
    clip = tiny_hf_clip()
    t, v = features(clip)
    assert t.shape == (3, 10, 48) and v.shape == (4, 48)


def test_openai_state_dict_roundtrip(tmp_path):
    clip = tiny_hf_clip()
    osd = clip_mod.hf_to_openai(clip.state_dict())
    assert "transformer.resblocks.1.attn.in_proj_weight" in osd and "visual.proj" in osd
    assert osd["text_projection"].shape == (64, 48)  # OpenAI stores [width, embed]
    path = tmp_path / "ViT-tiny.pt"
    torch.save(osd, path)
    loaded = load_clip(path).eval()
    assert loaded.config.text_config.hidden_act == "quick_gelu"
    assert loaded.config.vision_config.patch_size == 16 and loaded.config.projection_dim == 48
    for a, b in zip(features(clip), features(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_openai_torchscript_roundtrip(tmp_path):
    clip = tiny_hf_clip(seed=3)
    osd = clip_mod.hf_to_openai(clip.state_dict())
    osd["input_resolution"] = torch.tensor(32)  # buffers OpenAI's archives carry

    class Node(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Node()
    for key, val in osd.items():
        *path, leaf = key.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, Node())
            mod = getattr(mod, p)
        if val.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(val.clone()))
        else:
            mod.register_buffer(leaf, val.clone())
    path = tmp_path / "ViT-tiny-jit.pt"
    torch.jit.save(torch.jit.script(root), str(path))
    assert set(torch.jit.load(str(path)).state_dict()) == set(osd)
    loaded = load_clip(path).eval()
    for a, b in zip(features(clip), features(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_hf_directory(tmp_path):
    clip = tiny_hf_clip(seed=5)
    clip.save_pretrained(tmp_path / "hf")
    loaded = load_clip(tmp_path / "hf").eval()
    for a, b in zip(features(clip), features(loaded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt.*Accepted.*Hugging Face.*OpenAI"):
        load_clip(tmp_path / "nope.pt")
    (tmp_path / "d").mkdir()
    with pytest.raises(FileNotFoundError, match="without config.json"):
        load_clip(tmp_path / "d")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not an OpenAI ViT CLIP"):
        load_clip(tmp_path / "bad.pt")


# --- parts --------------------------------------------------------------------------------------
def test_wti_head_matches_loops():
    head = WTIHead(8)
    t, v = torch.randn(3, 5, 8), torch.randn(4, 2, 8)
    tm = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    vm = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]])
    a_t, a_v = head.text_weights(t, tm).detach(), head.video_weights(v, vm).detach()
    assert torch.all(a_t[tm == 0] == 0) and torch.all(a_v[vm == 0] == 0)
    torch.testing.assert_close(a_t.sum(1), torch.ones(3))
    assert torch.all(a_v[3] == 0)  # a video without valid frames
    s = head(t, tm, v, vm)
    th, vh = torch.nn.functional.normalize(t, dim=-1).detach(), torch.nn.functional.normalize(v, dim=-1).detach()
    want = torch.zeros(3, 4)
    for i in range(3):
        for j in range(4):
            S = [[float(th[i, l] @ vh[j, f]) * int(tm[i, l]) * int(vm[j, f]) for f in range(2)] for l in range(5)]
            t2v = sum(float(a_t[i, l]) * max(S[l]) for l in range(5))
            v2t = sum(float(a_v[j, f]) * max(S[l][f] for l in range(5)) for f in range(2))
            want[i, j] = (t2v + v2t) / 2
    torch.testing.assert_close(s, want)


def test_dpc_knn_two_groups():
    x = torch.cat([torch.randn(1, 4, 6) * 0.01, torch.randn(1, 3, 6) * 0.01 + 5], dim=1)
    a = dpc_knn(x, 2, k=3)
    assert len(set(a[0, :4].tolist())) == 1 and len(set(a[0, 4:].tolist())) == 1
    assert a[0, 0] != a[0, 4]
    # masked tokens never become centres while valid ones remain
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0]])
    a = dpc_knn(x, 2, k=3, mask=mask)
    assert a[0, 0] != a[0, 4]


@pytest.mark.parametrize("L", [1, 5, 24, 64])
def test_global_tokens_any_length(L):
    tok = GlobalTokenizer(32, 1 / 6, heads=4)
    x = torch.randn(3, L, 32)
    mask = torch.ones(3, L, dtype=torch.long)
    mask[1, max(1, L // 2):] = 0
    mask[2] = 0  # no valid token at all
    out = tok(x, mask)
    assert out.shape == (3, 32) and torch.isfinite(out).all()
    assert tok.cluster_counts(L)[1] == 1
    assert tok.cluster_counts(24) == (4, 1) and GlobalTokenizer(32, 1 / 4, heads=4).cluster_counts(12) == (3, 1)
    assert tok.cluster_counts(64) == (11, 1)
    out.sum().backward()
    assert all(p.grad is not None for p in tok.parameters())


def test_global_tokens_ignore_masked_content():
    tok = GlobalTokenizer(32, 1 / 4, heads=4, mlp=False)
    x = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[:, 7:] = 0
    x2 = x.clone()
    x2[:, 8:] = torch.randn(2, 4, 32)  # token 7 feeds the conv of token 6: keep it
    torch.testing.assert_close(tok(x, mask), tok(x2, mask))


def test_temporal_mask_and_residual(model):
    frames = torch.randn(2, 6, model.dim)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = model.temporal(frames, mask)
    frames2 = frames.clone()
    frames2[0, 3:] = torch.randn(3, model.dim)
    out2 = model.temporal(frames2, mask)
    torch.testing.assert_close(out[0, :3], out2[0, :3])
    torch.testing.assert_close(out[1], out2[1])
    # initialised from CLIP's text transformer
    torch.testing.assert_close(model.temporal.frame_position_embeddings.weight[:5],
                               model.clip.text_model.embeddings.position_embedding.weight[:5])
    sd0 = model.clip.text_model.encoder.layers[0].state_dict()
    for k, v in model.temporal.layers[0].state_dict().items():
        torch.testing.assert_close(v, sd0[k])


def test_logit_scale_clamp(model):
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))


def test_all_gather_identity():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x


# --- full model ---------------------------------------------------------------------------------
def make_bank(model, n_batches=4, B=16):
    bank = MemoryBank.for_features(64, model.config.max_words, model.config.max_frames, model.dim)
    for i in range(n_batches):
        bank.push(model.encode_for_bank(make_batch(B, seed=100 + i)))
    return bank


@pytest.mark.parametrize("centrality", ["mean", "knn"])
def test_forward_backward_batch16_bank64(centrality):
    torch.manual_seed(0)
    model = NeighborRetr(NeighborRetrConfig(**SMALL, centrality=centrality, num_neighbors=5)).train()
    bank = make_bank(model)
    assert len(bank) == 64
    out = model(make_batch(16), bank, update_bank=True)
    assert set(out) >= {"loss", "wti", "nbi", "opt", "kl", "logit_scale", "bank_items"}
    for k in ("loss", "wti", "nbi", "opt", "kl"):
        assert out[k].dim() == 0 and torch.isfinite(out[k]), k
    total = out["wti"] + out["opt"] + out["nbi"] + out["kl"]
    torch.testing.assert_close(out["loss"].detach(), total)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert bank.view()["ids"][:16].tolist() == list(range(16))  # pushed newest first


def test_centrality_options_differ_and_bank_matters():
    torch.manual_seed(0)
    model = NeighborRetr(NeighborRetrConfig(**SMALL, num_neighbors=3)).eval()
    bank = make_bank(model, 2)
    b = make_batch(12)
    with torch.no_grad():
        T, tm = model.encode_text(b["text_ids"], b["text_mask"])
        V, vm = model.encode_video(b["video"], b["video_mask"])
        mean = model.loss(T, tm, V, vm, bank)["nbi"]
        nobank = model.loss(T, tm, V, vm, None)["nbi"]
        model.config.centrality = "knn"
        knn = model.loss(T, tm, V, vm, bank)["nbi"]
        model.config.centrality = "mean"
        t2v, _ = model.bank_centrality(T, tm, V, vm, bank)
    assert t2v["bank_sim"].shape == (12, 32)
    assert mean != nobank and knn != mean


def test_loss_matches_independent_composition():
    torch.manual_seed(0)
    model = NeighborRetr(NeighborRetrConfig(**SMALL, num_neighbors=4)).eval()
    bank = make_bank(model, 1)
    b = make_batch(10)
    with torch.no_grad():
        T, tm = model.encode_text(b["text_ids"], b["text_mask"])
        V, vm = model.encode_video(b["video"], b["video_mask"])
        out = model.loss(T, tm, V, vm, bank)
        from nbretr import losses as L
        s = model.similarity(T, tm, V, vm)
        gt, gv = model.global_tokens_text(T, tm), model.global_tokens_video(V, vm)
        g = gt @ gv.T
        # centrality: mean over all B*L tokens of <g_i, x>, explicitly
        xt = torch.nn.functional.normalize(T.reshape(-1, T.shape[-1]), dim=-1)
        ct = (torch.nn.functional.normalize(gt, dim=-1) @ xt.T).mean(1)
        xv = torch.nn.functional.normalize(V.reshape(-1, V.shape[-1]), dim=-1)
        cv = (torch.nn.functional.normalize(gv, dim=-1) @ xv.T).mean(1)
        scale = model.logit_scale.exp()
        wti = (L.centrality_weighting_loss(scale * s, torch.exp(0.3 * ct))
               + L.centrality_weighting_loss(scale * s.T, torch.exp(0.3 * cv))) / 2
        f = bank.view()
        m_t2v = model.similarity(f["text"], f["text_mask"], V, vm).T
        m_v2t = model.similarity(T, tm, f["video"], f["video_mask"])
        nbi = (L.neighbor_adjusting_loss(s, m_t2v, 4, 3.0) + L.neighbor_adjusting_loss(s.T, m_v2t, 4, 3.0)) / 2
        opt = (L.uniform_regularization_loss(g, 3.0, 0.7, 50) + L.uniform_regularization_loss(g.T, 3.0, 0.7, 50)) / 2
        kl = (L.kl_consistency_loss(g, s) + L.kl_consistency_loss(g.T, s.T)) / 2
    torch.testing.assert_close(out["wti"], wti)
    torch.testing.assert_close(out["nbi"], nbi)
    torch.testing.assert_close(out["opt"], opt)
    torch.testing.assert_close(out["kl"], kl)


def test_baseline_is_symmetric_infonce():
    torch.manual_seed(0)
    model = NeighborRetr(NeighborRetrConfig(**SMALL, baseline=True)).train()
    assert not hasattr(model, "text_cluster")
    b = make_batch(8)
    out = model(b, make_bank(model, 1))
    assert out["nbi"] == 0 and out["opt"] == 0 and out["kl"] == 0
    with torch.no_grad():
        T, tm = model.encode_text(b["text_ids"], b["text_mask"])
        V, vm = model.encode_video(b["video"], b["video_mask"])
        logits = model.logit_scale.exp() * model.similarity(T, tm, V, vm)
        ce = torch.nn.functional.cross_entropy
        want = (ce(logits, torch.arange(8)) + ce(logits.T, torch.arange(8))) / 2
    torch.testing.assert_close(out["loss"].detach(), want)
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_autocast_bf16_cpu(model):
    b = make_batch(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(b, None)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_cuda(dtype):
    torch.manual_seed(0)
    model = NeighborRetr(NeighborRetrConfig(**SMALL, num_neighbors=5)).cuda().train()
    b = {k: v.cuda() for k, v in make_batch(16).items()}
    bank = MemoryBank.for_features(64, 12, 6, model.dim, device="cuda")
    with torch.no_grad():
        bank.push(model.encode_for_bank(b))
    with torch.autocast("cuda", dtype=dtype):
        out = model(b, bank)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_forward_ext_matches_torch():
    require_ext_ops("wti_similarity", "topk_centrality_dot", "sinkhorn_log")
    torch.manual_seed(0)
    for centrality in ("mean", "knn"):
        model = NeighborRetr(NeighborRetrConfig(**SMALL, num_neighbors=5, centrality=centrality)).train()
        bank = make_bank(model, 2)
        b = make_batch(16)
        res = {}
        for be in ("torch", "ext"):
            model.zero_grad()
            with ops.use_backend(be):
                out = model(b, bank)
            out["loss"].backward()
            res[be] = ({k: out[k].detach() for k in ("loss", "wti", "nbi", "opt", "kl")},
                       {n: p.grad.clone() for n, p in model.named_parameters()})
        for k, v in res["torch"][0].items():
            torch.testing.assert_close(res["ext"][0][k], v, rtol=1e-5, atol=1e-6)
        # fp32 gradients through the whole model, summed in different orders by the two
        # paths: compared relative to the largest gradient (some are zero up to rounding,
        # e.g. attention key biases)
        scale = max(float(g.abs().max()) for g in res["torch"][1].values())
        for n, g in res["torch"][1].items():
            torch.testing.assert_close(res["ext"][1][n], g, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("detach", [False, True])
def test_centrality_weights_gradient_option(detach):
    """Reference default: L_wti's weights carry gradient (and it always pushes c_i down);
    detach_centrality=True makes them constants, leaving the scores' gradient unchanged."""
    torch.manual_seed(0)
    m = NeighborRetr(NeighborRetrConfig(max_words=6, max_frames=4, vocab_size=30, detach_centrality=detach))
    tokens = torch.randn(5, 6, m.dim)
    g = torch.randn(5, m.dim, requires_grad=True)
    w = m.centrality_weights(tokens, g)
    assert w.requires_grad is (not detach)
    logits = torch.randn(5, 5)
    from nbretr import losses
    loss = losses.centrality_weighting_loss(logits, w)
    if detach:
        assert not loss.requires_grad
    else:
        loss.backward()
        assert g.grad.abs().sum() > 0

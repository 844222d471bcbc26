"""The independent PyTorch reference: HF transformers' LlamaForCausalLM holding TeleChat2 weights.

Mapping (../shared/docs/reference_equivalence.md): attention_bias/mlp_bias on, q/k/v/gate/up biases zero,
o_proj.bias = wo.bias, down_proj.bias = w2.bias; key_value [2*k*d, H] de-interleaved per kv head
(reshape [k, 2, d, H]: [:,0] is K, [:,1] is V); rotary cos/sin rounded to fp16 as the official code does.
"""
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def ms_state_numpy(model):
    """MindSpore model -> {MindFormers name: float32 numpy array}."""
    return {p.name: p.asnumpy().astype(np.float32) for p in model.get_parameters()}


def split_key_value(w_kv: np.ndarray, kv_heads: int, head_dim: int):
    """[2*k*d, H] per-head interleaved -> (K [k*d, H], V [k*d, H])."""
    w4 = w_kv.reshape(kv_heads, 2, head_dim, w_kv.shape[-1])
    return w4[:, 0].reshape(-1, w_kv.shape[-1]), w4[:, 1].reshape(-1, w_kv.shape[-1])


def _fp16_rotary(rotary):
    original = rotary.forward

    def forward(x, position_ids):
        cos, sin = original(x, position_ids)
        return cos.half().to(cos.dtype), sin.half().to(sin.dtype)

    rotary.forward = forward


def llama_reference(cfg, state: dict, fp16_rotary: bool = True, attn_implementation: str = "eager") -> LlamaForCausalLM:
    """Build an fp32 LlamaForCausalLM equal to TeleChat2 with `state` (MindFormers names); eager attention by
    default (the parity tests), "sdpa" for speed (research/bench_speed.py)."""
    d, H = cfg.head_dim, cfg.hidden_size
    conf = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=H, intermediate_size=cfg.ffn_hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, head_dim=d, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, max_position_embeddings=cfg.training_seqlen,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                       bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id, attn_implementation=attn_implementation)
    with torch.device("meta"):
        ref = LlamaForCausalLM(conf)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    zeros = lambda n: torch.zeros(n, dtype=torch.float32)
    sd = {"model.embed_tokens.weight": t(state["model.tok_embeddings.embedding_weight"]),
          "model.norm.weight": t(state["model.norm_out.weight"]),
          "lm_head.weight": t(state["lm_head.weight"])}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        k, v = split_key_value(state[src + "attention.wk_v.weight"], cfg.num_kv_heads, d)
        sd.update({
            dst + "input_layernorm.weight": t(state[src + "attention_norm.weight"]),
            dst + "post_attention_layernorm.weight": t(state[src + "ffn_norm.weight"]),
            dst + "self_attn.q_proj.weight": t(state[src + "attention.wq.weight"]),
            dst + "self_attn.q_proj.bias": zeros(cfg.num_heads * d),
            dst + "self_attn.k_proj.weight": t(k), dst + "self_attn.k_proj.bias": zeros(cfg.kv_dim),
            dst + "self_attn.v_proj.weight": t(v), dst + "self_attn.v_proj.bias": zeros(cfg.kv_dim),
            dst + "self_attn.o_proj.weight": t(state[src + "attention.wo.weight"]),
            dst + "self_attn.o_proj.bias": t(state[src + "attention.wo.bias"]),
            dst + "mlp.gate_proj.weight": t(state[src + "feed_forward.w1.weight"]),
            dst + "mlp.gate_proj.bias": zeros(cfg.ffn_hidden_size),
            dst + "mlp.up_proj.weight": t(state[src + "feed_forward.w3.weight"]),
            dst + "mlp.up_proj.bias": zeros(cfg.ffn_hidden_size),
            dst + "mlp.down_proj.weight": t(state[src + "feed_forward.w2.weight"]),
            dst + "mlp.down_proj.bias": t(state[src + "feed_forward.w2.bias"]),
        })
    ref.load_state_dict(sd, strict=True, assign=True)
    ref.model.rotary_emb = type(ref.model.rotary_emb)(conf)  # rebuild the (non-persistent) inv_freq buffer
    if fp16_rotary:
        _fp16_rotary(ref.model.rotary_emb)
    return ref.eval()


def randomize_biases_and_norms(model, seed: int = 1):
    """Give wo/w2 biases and norm weights non-trivial values so the parity test sees them."""
    rng = np.random.default_rng(seed)
    from mindspore import Tensor
    for p in model.get_parameters():
        if p.name.endswith(".bias"):
            p.set_data(Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
        elif p.name.endswith("norm.weight") or p.name.endswith("norm_out.weight"):
            p.set_data(Tensor(rng.normal(1.0, 0.1, p.shape).astype(np.float32)))


def qwen2_reference(cfg, state: dict, attn_implementation: str = "eager"):
    """An fp32 transformers Qwen2ForCausalLM holding `state` (MindFormers / research-qwen2 names), with the
    config's GQA, tied embeddings and sliding-window layers (layer_types)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layer_types = ["sliding_attention" if i in cfg.sliding_layers else "full_attention" for i in range(cfg.num_layers)]
    conf = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       max_position_embeddings=cfg.training_seqlen, tie_word_embeddings=cfg.tie_word_embeddings,
                       use_sliding_window=bool(cfg.sliding_layers), sliding_window=cfg.sliding_window or None,
                       layer_types=layer_types, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                       pad_token_id=cfg.pad_token_id, attn_implementation=attn_implementation)
    ref = Qwen2ForCausalLM(conf)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    sd = {"model.embed_tokens.weight": t(state["model.tok_embeddings.embedding_weight"]),
          "model.norm.weight": t(state["model.norm_out.weight"])}
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else t(state["lm_head.weight"])
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        sd.update({dst + "input_layernorm.weight": t(state[src + "attention_norm.weight"]),
                   dst + "post_attention_layernorm.weight": t(state[src + "ffn_norm.weight"]),
                   dst + "self_attn.o_proj.weight": t(state[src + "attention.wo.weight"]),
                   dst + "mlp.gate_proj.weight": t(state[src + "feed_forward.w1.weight"]),
                   dst + "mlp.up_proj.weight": t(state[src + "feed_forward.w3.weight"]),
                   dst + "mlp.down_proj.weight": t(state[src + "feed_forward.w2.weight"])})
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            sd[dst + f"self_attn.{theirs}.weight"] = t(state[src + f"attention.{ours}.weight"])
            sd[dst + f"self_attn.{theirs}.bias"] = t(state[src + f"attention.{ours}.bias"])
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    return ref.eval()


class RoutedMoE(torch.nn.Module):
    """families.md 3, written independently of the port: router logits x @ router^T in fp32, softmax over all E
    experts, top-k, the k weights renormalised when `norm`; out = sum over the chosen experts of weight *
    (w2_e(silu(w1_e x) * w3_e x) + b2_e), each expert on its own tokens only; plus, with a shared expert,
    sigmoid(gate x) * shared(x). Records each call's probabilities and choices in `self.calls` for the aux loss."""

    def __init__(self, state: dict, prefix: str, k: int, norm: bool, shared: bool):
        super().__init__()
        t = lambda name: torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(state[prefix + name], np.float32)))
        routed = "routed_experts." if shared else ""
        self.router = t(routed + "router.dense.weight")
        self.w1, self.w3, self.w2 = (t(routed + f"ffn.{w}.weight") for w in ("w1", "w3", "w2"))
        self.b2 = t(routed + "ffn.w2.bias") if prefix + routed + "ffn.w2.bias" in state else None
        if shared:
            self.s1, self.s3, self.s2 = (t(f"shared_experts.{w}.weight") for w in ("w1", "w3", "w2"))
            self.gate = t("shared_experts_gate.weight")
        self.k, self.norm = k, norm
        self.calls = []

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = torch.softmax(flat.float() @ self.router.T, -1)
        top_p, top_i = torch.topk(probs, self.k, -1)
        if self.norm:
            top_p = top_p / top_p.sum(-1, keepdim=True)
        self.calls.append((probs, top_i))
        out = torch.zeros_like(flat)
        for e in range(self.w1.shape[0]):
            rows, slot = torch.where(top_i == e)
            if rows.numel() == 0:
                continue
            xe = flat[rows]
            ye = (torch.nn.functional.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)) @ self.w2[e].T
            if self.b2 is not None:
                ye = ye + self.b2[e]
            out = out.index_add(0, rows, ye * top_p[rows, slot, None])
        if hasattr(self, "gate"):
            shared = (torch.nn.functional.silu(flat @ self.s1.T) * (flat @ self.s3.T)) @ self.s2.T
            out = out + torch.sigmoid(flat @ self.gate.T) * shared
        return out.reshape(shape)


def telechat2_moe_reference(cfg, state: dict):
    """The TeleChat2 LlamaForCausalLM reference (llama_reference) with each sparse layer's MLP a RoutedMoE."""
    dense = dict(state)
    for i in cfg.sparse_layers:
        src = f"model.layers.{i}.feed_forward."
        dense[src + "w1.weight"] = dense[src + "w3.weight"] = np.zeros((cfg.ffn_hidden_size, cfg.hidden_size))
        dense[src + "w2.weight"] = np.zeros((cfg.hidden_size, cfg.ffn_hidden_size))
        dense[src + "w2.bias"] = np.zeros(cfg.hidden_size)
    ref = llama_reference(cfg, dense)
    for i in cfg.sparse_layers:
        ref.model.layers[i].mlp = RoutedMoE(state, f"model.layers.{i}.feed_forward.", cfg.num_experts_per_tok,
                                            cfg.norm_topk_prob, shared=False)
    return ref.eval()


def qwen2_moe_reference(cfg, state: dict):
    """An fp32 transformers Qwen2MoeForCausalLM holding `state` (MindFormers' qwen2_moe names: stacked experts
    `feed_forward.routed_experts.ffn.w1/w3/w2` [E, ...], router `routed_experts.router.dense`, `shared_experts`,
    `shared_experts_gate`); transformers 5 keeps the experts fused as gate_up_proj [E, 2F, H] and down_proj."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    conf = Qwen2MoeConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
                          num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                          rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": cfg.rope_theta},
                          max_position_embeddings=cfg.training_seqlen, tie_word_embeddings=cfg.tie_word_embeddings,
                          num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                          moe_intermediate_size=cfg.moe_ffn_hidden_size,
                          shared_expert_intermediate_size=cfg.shared_expert_ffn_hidden_size,
                          norm_topk_prob=cfg.norm_topk_prob, decoder_sparse_step=cfg.decoder_sparse_step,
                          mlp_only_layers=list(cfg.mlp_only_layers), router_aux_loss_coef=cfg.router_aux_loss_coef,
                          bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
                          attn_implementation="eager")
    ref = Qwen2MoeForCausalLM(conf)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    sd = {"model.embed_tokens.weight": t(state["model.tok_embeddings.embedding_weight"]),
          "model.norm.weight": t(state["model.norm_out.weight"]), "lm_head.weight": t(state["lm_head.weight"])}
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        sd.update({dst + "input_layernorm.weight": t(state[src + "attention_norm.weight"]),
                   dst + "post_attention_layernorm.weight": t(state[src + "ffn_norm.weight"]),
                   dst + "self_attn.o_proj.weight": t(state[src + "attention.wo.weight"])})
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
            sd[dst + f"self_attn.{theirs}.weight"] = t(state[src + f"attention.{ours}.weight"])
            sd[dst + f"self_attn.{theirs}.bias"] = t(state[src + f"attention.{ours}.bias"])
        ff = src + "feed_forward."
        if cfg.is_sparse(i):
            sd.update({
                dst + "mlp.gate.weight": t(state[ff + "routed_experts.router.dense.weight"]),
                dst + "mlp.experts.gate_up_proj": t(np.concatenate([state[ff + "routed_experts.ffn.w1.weight"],
                                                                    state[ff + "routed_experts.ffn.w3.weight"]], 1)),
                dst + "mlp.experts.down_proj": t(state[ff + "routed_experts.ffn.w2.weight"]),
                dst + "mlp.shared_expert.gate_proj.weight": t(state[ff + "shared_experts.w1.weight"]),
                dst + "mlp.shared_expert.up_proj.weight": t(state[ff + "shared_experts.w3.weight"]),
                dst + "mlp.shared_expert.down_proj.weight": t(state[ff + "shared_experts.w2.weight"]),
                dst + "mlp.shared_expert_gate.weight": t(state[ff + "shared_experts_gate.weight"])})
        else:
            sd.update({dst + "mlp.gate_proj.weight": t(state[ff + "w1.weight"]),
                       dst + "mlp.up_proj.weight": t(state[ff + "w3.weight"]),
                       dst + "mlp.down_proj.weight": t(state[ff + "w2.weight"])})
    ref.load_state_dict(sd, strict=True)
    return ref.eval()

"""Kimi-VL-A3B-Instruct: a published checkpoint directory given by flag.

    python main.py --config=configs/kimivl.py --config.model.path=/data/Kimi-VL-A3B-Instruct \
        --config.data.calib_json=/data/sharegpt4v.json --config.data.image_dir=/data/coco \
        --workdir=runs/kimivl_w3

The model's dimensions are read from the checkpoint's own config.json when it is loaded; the
`reference` section below records the published values, used by benchmarks that size synthetic
checkpoints and memory plans at the real widths (the pipeline itself never reads it). Source of
every value: moonshotai/Kimi-VL-A3B-Instruct config.json as summarised in shared/docs/models.md
(vision `vision_config`, text `text_config`), and the MODE paper's recipe (method.md) for the run
settings.
"""

import ml_collections

from configs import common


def get_config():
    c = common.get_config()
    c.model.dtype = "bfloat16"  # published weights are bf16; keep them so (16B params)

    r = ml_collections.ConfigDict()
    # vision_config (MoonViT)
    r.vision_hidden_size = 1152  # vision_config.hidden_size
    r.vision_num_layers = 27  # vision_config.num_hidden_layers
    r.vision_num_heads = 16  # vision_config.num_attention_heads
    r.vision_intermediate_size = 4304  # vision_config.intermediate_size
    r.patch_size = 14  # vision_config.patch_size
    r.pos_emb_hw = (64, 64)  # vision_config.init_pos_emb_height / _width
    r.merge_kernel = (2, 2)  # vision_config.merge_kernel_size
    # text_config (DeepSeek-V3 form)
    r.hidden_size = 2048  # text_config.hidden_size
    r.num_layers = 27  # text_config.num_hidden_layers
    r.first_k_dense_replace = 1  # text_config.first_k_dense_replace: layer 0 is a dense MLP
    r.intermediate_size = 11264  # text_config.intermediate_size (dense layer)
    r.n_routed_experts = 64  # text_config.n_routed_experts
    r.moe_intermediate_size = 1408  # text_config.moe_intermediate_size
    r.n_shared_experts = 2  # text_config.n_shared_experts
    r.num_experts_per_tok = 6  # text_config.num_experts_per_tok
    r.routed_scaling_factor = 2.446  # text_config.routed_scaling_factor
    r.kv_lora_rank = 512  # text_config.kv_lora_rank; q_lora_rank is null
    r.qk_nope_head_dim = 128  # text_config.qk_nope_head_dim
    r.qk_rope_head_dim = 64  # text_config.qk_rope_head_dim
    r.v_head_dim = 128  # text_config.v_head_dim
    r.num_heads = 16  # text_config.num_attention_heads
    r.vocab_size = 163840  # text_config.vocab_size
    r.rope_theta = 800000.0  # text_config.rope_theta
    r.media_placeholder_token_id = 163605  # config.media_placeholder_token_id
    c.reference = r

    c.data.batch_size = 4
    c.data.max_length = 4096
    c.lock()
    return c

"""Qwen3-VL-30B-A3B-Instruct (transformers `qwen3_vl_moe`): a checkpoint directory given by flag.

    python main.py --config=configs/qwen3vl_moe.py \
        --config.model.path=/data/Qwen3-VL-30B-A3B-Instruct \
        --config.data.calib_json=/data/sharegpt4v.json --config.data.image_dir=/data/coco \
        --workdir=runs/qwen3vl_w3

The same stages as Kimi-VL (the family is read from config.json's model_type, see
mode_jax/convert/families.py); prompts come from the checkpoint's chat template and images from
its image processor (mode_jax/preprocess_qwen3vl.py; images only, no video). `reference`
records the published dimensions as summarised in shared/docs/models.md; the model is built from
the checkpoint's own config.json.
"""

import ml_collections

from configs import common


def get_config():
    c = common.get_config()
    c.model.dtype = "bfloat16"  # published weights are bf16 (about 31B parameters)

    r = ml_collections.ConfigDict()
    r.num_layers = 48  # text_config.num_hidden_layers: every layer is MoE
    r.num_experts = 128  # text_config.num_experts
    r.num_experts_per_tok = 8  # softmax router, renormalised top-8, no shared expert
    r.vision_patch_size = 16  # vision_config.patch_size
    r.spatial_merge_size = 2  # vision_config.spatial_merge_size (2x2 merger)
    r.image_token_id = 151655  # config.image_token_id (<|image_pad|>)
    c.reference = r

    c.data.batch_size = 4
    c.data.max_length = 4096
    c.lock()
    return c

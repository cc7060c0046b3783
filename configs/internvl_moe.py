"""InternVL3.5-30B-A3B-HF (transformers `internvl` with a `qwen3_moe` language model): a
checkpoint directory given by flag.

    python main.py --config=configs/internvl_moe.py \
        --config.model.path=/data/InternVL3_5-30B-A3B-HF \
        --config.data.calib_json=/data/sharegpt4v.json --config.data.image_dir=/data/coco \
        --workdir=runs/internvl_w3

The same stages as Kimi-VL (the family is read from config.json's model_type, see
mode_jax/convert/families.py); prompts come from the checkpoint's chat template and images from
its image processor, cut into 448 x 448 tiles (mode_jax/preprocess_internvl.py; images only, no
video). `reference` records the published dimensions as summarised in shared/docs/models.md;
the model is built from the checkpoint's own config.json.
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
    r.vision_tile = 448  # vision_config.image_size: InternViT encodes 448 x 448 tiles
    r.tokens_per_tile = 256  # (448 / 14)^2 patches, pixel-shuffled by 0.5
    c.reference = r

    c.data.batch_size = 4
    c.data.max_length = 4096
    c.lock()
    return c

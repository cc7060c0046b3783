"""Defaults shared by every run; model configs override the `model` and `data` sections.

Every method and ablation is a field here, so a run is reproduced by its config alone:
    python main.py --config=configs/testbed.py --config.sweep='("pmq",)' \
        --config.alloc.budget_bits=2.5
Tuple fields are overridden as strings: --config.alloc.bits='(1,2,3)'.
"""

import ml_collections

REPO_ROOT = __file__.rsplit("/configs/", 1)[0]


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # the last stage to run: convert | calibrate | sensitivity | allocate | quantize | evaluate
    # (e.g. quantize: the packed model without the evaluation; the report needs allocate)
    c.final_stage = "evaluate"

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # checkpoint directory in the published layout (config.json + safetensors)
    c.model.dtype = "float32"  # compute/storage dtype of the converted full-precision model
    # float32 matmuls: "highest" = true float32, as the PyTorch reference computes them. On
    # GPUs "default"/"tensorfloat32" is TF32: faster, but on an H100 it moved the testbed's
    # logits up to 0.84 from the reference (routing flips), against 1e-5 on CPU.
    c.model.matmul_precision = "highest"

    c.data = ml_collections.ConfigDict()
    c.data.source = "sharegpt"  # sharegpt (calib_json + image_dir) | testbed | random
    c.data.calib_json = ""  # ShareGPT4V-style JSON; needed when source is sharegpt
    c.data.image_dir = ""
    c.data.testbed_stats_tasks = "vision"  # testbed source: statistics on vision | all tasks
    # records per draw (method.md stages 1 and 2); with ShareGPT data 0 draws every record
    c.data.num_freq_samples = 512
    c.data.num_sens_samples = 128
    c.data.num_gptq_samples = 128
    c.data.batch_size = 8
    c.data.max_length = 512
    # a batch's padded length: a multiple of 32 and one of this many lengths per doubling
    # (8: at most 12.5% padding); every distinct length is one more program to compile per
    # pass, tens of seconds each at Kimi-VL-A3B's size. 0: every multiple of 32.
    # data.padded_length
    c.data.lengths_per_doubling = 8
    # tokens per calibration (and held-out) image at most (0: the checkpoint's image processor
    # settings): lowers large images' resolution, and with it prompt length and memory; a
    # benchmark (eval.jsonl) keeps the checkpoint's settings. processors.image_processor
    c.data.max_image_tokens = 0

    c.stats = ml_collections.ConfigDict()
    c.stats.key_ratio = 0.2  # r: fraction of image tokens kept as key tokens
    c.stats.attention_mode = "per_layer"  # per_layer | judge_layer | all_tokens
    c.stats.judge_layer = -1  # decoder layer used when attention_mode == judge_layer

    c.sens = ml_collections.ConfigDict()
    c.sens.estimator = "expert_mse"  # expert_mse | logit_kl | fisher
    c.sens.group_size = 128
    c.sens.quantizer = "rtn"  # rtn (method.md stage 2) | gptq (copies as the quantize stage makes)
    c.sens.max_tokens = 65536  # cached MoE-input tokens per layer for the token estimators
    c.sens.hutchinson_probes = 100  # MoPEQ
    # MoPEQ's trace: hessian (method.md) | gauss_newton (its PSD part; on random tokens the
    # Hessian's traces are mostly negative, see passes.hessian_trace_pass)
    c.sens.trace_curvature = "hessian"
    # MoE layers whose experts one Hutchinson pass probes (0 = as many as fit the free device
    # memory; a pass per block of layers, see passes.hessian_trace_pass)
    c.sens.trace_layers_per_pass = 0
    # random sequences per Hessian-trace batch (0 = data.batch_size); smaller needs less memory
    c.sens.trace_batch_size = 0
    # logit_kl: (expert, bit) variants re-run per folded batch of 2 * kl_chunk * batch_size
    # sequences; lower it when the suffix forward runs out of device memory
    c.sens.kl_chunk = 8

    c.alloc = ml_collections.ConfigDict()
    c.alloc.method = "mode"  # mode | uniform | pmq | gemq | mopeq | mopeq-budget | random
    c.alloc.budget_bits = 3.0  # average bits per routed expert
    c.alloc.bits = (2, 3, 4)  # candidate bit-widths
    c.alloc.scope = "layer"  # layer | global
    c.alloc.equality = True
    c.alloc.freq_key = "text+key"  # total | text+all-image | text+key | text+redundant
    c.alloc.vision_mix = 0.5  # weight of the vision term (1 - it for text); 0.5 = paper's sum
    c.alloc.solver = "scip"  # scip | dp
    c.alloc.pmq_a = 1.0
    c.alloc.pmq_b = 1.5
    c.alloc.mopeq_scope = "layer"  # layer | global
    c.alloc.random_seed = 0  # method "random": the uninformed control's draw

    c.quant = ml_collections.ConfigDict()
    c.quant.method = "gptq"  # gptq | rtn
    c.quant.group_size = 128
    c.quant.damp = 0.01
    c.quant.block_size = 128
    c.quant.act_order = False
    c.quant.symmetric = True
    c.quant.attention_bits = 4
    c.quant.shared_expert_bits = 4
    c.quant.dense_mlp_bits = 4
    c.quant.hadamard = False
    c.quant.router_finetune = False

    c.eval = ml_collections.ConfigDict()
    # 0 = the whole held-out split (testbed: 400 samples; ShareGPT data: up to 256 records no
    # stage drew; random tokens: 8)
    c.eval.num_samples = 0
    c.eval.jsonl = ""  # a user benchmark in eval/jsonl.py's format (scored with the tokenizer)
    c.eval.batch_size = 32
    c.eval.max_new_tokens = 8
    c.eval.use_kernels = False  # route packed experts through pallas_kernels
    c.eval.kernel_dequant = ""  # "" = the backend's frozen default | convert | magic | registers

    c.mesh = ml_collections.ConfigDict()
    # devices along the expert axis; the rest form the "data" axis, over which every stage
    # splits each batch's rows (data.batch_size and eval.batch_size: multiples of it)
    c.mesh.expert = 1

    c.sweep = ()  # methods to run on the same statistics, e.g. ('mode', 'uniform', 'pmq')
    # jax's persistent compilation cache: "auto" = <workdir>/jax_cache (reruns, resumed runs and
    # ablations on the same workdir skip XLA compiles), "" = off, else a directory. An already
    # set JAX_COMPILATION_CACHE_DIR wins.
    c.compilation_cache = "auto"
    return c

"""The configuration schema: defaults (one function per section) and the allowed values of every choice.

Every config file in `configs/` starts from `base_config()` and overrides fields. The allowed values are written
here once and read by validate.py (the checks), resolve.py ('auto' per backend), optim/muon.py and tools/bench/.
`config.typed.parse` turns a ConfigDict into the frozen typed pieces the rest of the package takes (validate.py
raises `ConfigError` naming the field and the fix).

Sections:
  model  - transformer shape and numerics (vocab_size is the tokenizer's size).
  moe    - the sparse feed-forward: experts, routing, capacity, auxiliary losses. `num_experts == 0` means dense.
  optim  - Muon + AdamW (or plain AdamW), schedules, clipping.
  train  - steps (optimizer steps, not micro-batches), batch (global micro-batch), accumulation, cadence.
  data   - source, tokenizer, packing.
  mesh   - device mesh shape over axes ('data', 'expert', 'model'); one -1 fills the remaining devices; fsdp.
"""

from __future__ import annotations


import ml_collections

AUTO = "auto"  # resolved per backend by config/resolve.py
MESH_AXES = ("data", "expert", "model")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: resolve.COMPUTE_DTYPE per backend
MLP_TYPES = ("gelu", "gelu_exact", "swiglu", "silu")
ROPE_LAYOUTS = ("halves", "adjacent")
FLOAT32_EPS = 1.1920928955078125e-07  # numpy.finfo(float32).eps: torch.nn.RMSNorm's eps when eps=None (the seeds)
DATA_SOURCES = ("bible", "tfds", "files")
PACKING = ("concat", "segments")
ATTENTION = ("auto", "blocked", "xla", "cudnn")  # auto: resolve.ATTENTION per backend
MOE_DISPATCH = ("capacity", "dropless")
LOAD_BALANCE_FORMS = ("switch", "prob_squares")  # E * sum f_e P_e (Switch) | E * sum P_e^2 (seed exp5)
GROUPED_MATMULS = ("ragged_dot", "megablox")
OPTIMIZERS = ("muon", "adamw")
MUON_IMPLS = ("batched", "optax")  # 'batched': moe_jax/optim/muon.py; 'optax': optax.contrib.muon
MUON_SCALES = ("keller", "moonlight")
# Newton-Schulz settings; 'auto' resolves per backend (config/resolve.py). NS_METHODS[1:] is what muon.py runs.
NS_DTYPES = ("auto", "float32", "bfloat16", "float16")
NS_ROUNDINGS = ("operands", "every_op")  # 'every_op': the seeds' torch arithmetic (optim/muon.py: newton_schulz)
NS_STACKS = ("auto", "layers", "none")
NS_METHODS = ("auto", "standard", "gram")
NONFINITE_ACTIONS = ("stop", "skip")
INJECT_NAN_MODES = ("all", "grads", "grads_from")
VAL_WINDOW_SAMPLING = ("first", "even")


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field and how to fix it."""


def model_section() -> ml_collections.ConfigDict:
    """`config.model`: transformer shape and numerics (defaults)."""
    s = ml_collections.ConfigDict()
    s.vocab_size = 8192
    s.d_model = 384
    s.n_layers = 6
    s.n_heads = 8
    s.d_ff = 1536
    s.mlp = "gelu"  # dense FFN and experts: 'gelu' (tanh approx.) | 'gelu_exact' (erf) | 'silu' | 'swiglu'
    s.dropout = 0.1
    s.tie_embeddings = True
    s.embed_scale = False  # multiply embeddings by sqrt(d_model) (seed 002)
    s.rope_base = 10000.0
    s.rope_layout = "halves"  # RoPE pairs: 'halves' (i, i + D/2; seed exp5) | 'adjacent' (2i, 2i + 1; seed 002)
    s.norm_eps = 1e-6  # RMSNorm eps (the seeds' torch.nn.RMSNorm(eps=None) uses FLOAT32_EPS)
    s.init_std = 0.02
    s.dtype = "auto"  # compute dtype ('auto': bfloat16 on GPU/TPU, float32 on CPU); params always float32
    s.remat = False  # rematerialise each block in the backward pass
    s.attention = "auto"  # 'auto' (CPU: blocked, GPU: cudnn, TPU: xla), 'blocked' (skips key blocks above
    #   the diagonal), 'xla' (jax.nn.dot_product_attention) or 'cudnn' (cuDNN fused flash attention; GPU only)
    s.attention_block = 128  # queries per block for 'blocked' (0: one block)
    return s


def moe_section() -> ml_collections.ConfigDict:
    """`config.moe`: the sparse feed-forward (defaults)."""
    s = ml_collections.ConfigDict()
    s.num_experts = 8  # 0: dense model
    s.top_k = 2
    s.every = 1  # layer i is MoE when i % every == every - 1 (every=1: all; every=2: layers 1, 3, 5)
    s.d_ff = 1536  # hidden width of each expert
    s.dispatch = "capacity"  # 'capacity' (einsum dispatch into C slots per expert; drops) | 'dropless' (sorted
    #   assignments, grouped matmuls: moe_jax/model/dropless.py). Same parameters: switching is a config change.
    s.grouped_matmul = "ragged_dot"  # dropless only: 'ragged_dot' (jax.lax.ragged_dot) | 'megablox' (Pallas TPU)
    s.capacity_factor = 1.25
    s.eval_capacity_factor = 2.0
    s.min_capacity = 4
    s.group_size = 256  # tokens per routing group: dispatch/combine einsums cost 2*k*T*cf*M FLOPs per token each
    s.renormalize = True  # renormalise the k routing weights to sum to 1 (top_k > 1 only: at top_k = 1 the gate
    #   is the raw probability, as in Switch, so the router keeps its gradient from the LM loss)
    s.load_balance_weight = 0.01
    s.load_balance_form = "switch"  # 'switch': E * sum_e f_e P_e (f: share of the top-k assignments, P: mean router
    #   probability); 'prob_squares': E * sum_e P_e^2 (seed exp5: ignores the assignments)
    s.z_loss_weight = 0.001
    s.router_noise_std = 0.0  # Gaussian noise on router logits in training (seed 002 used 0.1)
    return s


def optim_section() -> ml_collections.ConfigDict:
    """`config.optim`: Muon + AdamW (defaults)."""
    s = ml_collections.ConfigDict()
    s.name = "muon"  # 'muon' (Muon for hidden matrices + AdamW for the rest) | 'adamw' (AdamW for all)
    s.muon_lr = 0.01
    s.adamw_lr = 1e-3
    s.momentum = 0.95
    s.nesterov = True
    s.ns_steps = 5
    s.muon_impl = "batched"  # 'batched' (moe_jax/optim/muon.py: one Newton-Schulz per shape group) | 'optax'
    s.ns_dtype = "auto"  # Newton-Schulz dtype: 'auto' (resolve.NS_DTYPE per backend) | 'float32' | 'bfloat16'
    s.ns_stack = "auto"  # 'layers' (one chain per weight across layers) | 'none' (one per parameter) | 'auto'
    s.ns_method = "auto"  # 'gram' (float32 Gram-space NS for wide matrices) | 'standard' | 'auto' (per backend)
    s.ns_rounding = "operands"  # 'operands': ns_dtype matmul operands, float32 accumulation and sums; 'every_op':
    #   every product, sum and the norm rounded to ns_dtype (the seeds' torch arithmetic; ns_method 'standard')
    s.ns_eps = 1e-8  # Newton-Schulz normalisation X / (||X||_F + ns_eps) (optax's default; the seeds' 1e-7)
    s.muon_fused_qkv = False  # orthogonalise each layer's q, k, v as ONE [M, 3M] matrix (the seeds' fused qkv
    #   Linear; Keller scale sqrt(3)) instead of three [M, M] ones
    s.muon_bias_correction = True  # optax's bias-corrected (Nesterov) momentum; False: the seeds' buf = b buf +
    #   (1 - b) g, update b buf + (1 - b) g (Nesterov) or buf, never divided by 1 - b^t
    s.momentum_warmup_steps = 0  # > 0: Muon momentum rises linearly from momentum_warmup_start to optim.momentum
    #   over this many optimizer steps (seed 004's MuonWithWarmup); needs muon_bias_correction=False
    s.momentum_warmup_start = 0.85
    s.muon_scale = "keller"  # 'keller': sqrt(max(1, fan_out/fan_in)); 'moonlight': 0.2*sqrt(max(fan_in, fan_out))
    s.muon_weight_decay = 0.0
    s.b1 = 0.9
    s.b2 = 0.95
    s.eps = 1e-8
    s.weight_decay = 0.1
    s.decay_norms = False  # AdamW weight decay on norm scales and biases too (the seeds' AdamW decays them)
    s.clip_norm = 1.0  # 0 disables clipping
    s.warmup_fraction = 0.05  # used when warmup_steps < 0
    s.warmup_steps = -1
    s.min_lr_ratio = 0.1  # cosine decays to this fraction of the peak
    s.schedule_steps = 0  # length of the warmup + cosine schedule in optimizer steps; 0: train.steps. Larger: the
    #   run stops early on it (the seeds laid their schedule over micro-batches, stepped once per optimizer step)
    s.warmup_from_zero = False  # torch LambdaLR's count: step s at lr peak * s / W (the first step at lr 0) and the
    #   cosine's floor at step N (never reached); default: (s + 1) / W and the floor at the last step
    s.router_muon = False  # route the MoE router through Muon instead of AdamW
    return s


def train_section() -> ml_collections.ConfigDict:
    """`config.train`: length, batch and cadence (defaults)."""
    s = ml_collections.ConfigDict()
    s.steps = 20000  # optimizer steps
    s.batch_size = 24  # global sequences per micro-batch
    s.grad_accum = 4  # micro-batches per optimizer step
    s.seq_len = 512
    s.log_every = 50
    s.eval_every = 500
    s.eval_batches = 16  # 0: the whole validation set
    s.checkpoint_every = 1000
    s.keep_checkpoints = 3
    s.async_checkpoint = True
    s.peak_tflops = 0.0  # 0: look up the device in flops.PEAK_TFLOPS (CPU: measured)
    s.plots = True
    s.progress_bar = True
    s.inject_nan_at_step = -1  # test hook: poison this step (numbered from 1; -1: off)
    s.inject_nan_mode = "all"  # 'all': the loss and the gradients; 'grads': the gradients only (loss finite);
    #   'grads_from': the gradients of that step and of every later one
    s.on_nonfinite = "stop"  # a step whose loss, grad norm or new state is not finite: 'stop' before any save,
    #   or 'skip' its update (the step is counted and logged) and stop after train.max_skipped_steps in a row
    s.max_skipped_steps = 10
    return s


def data_section() -> ml_collections.ConfigDict:
    """`config.data`: source, tokenizer, packing (defaults)."""
    s = ml_collections.ConfigDict()
    s.source = "bible"  # 'bible' (shipped), 'tfds' (any TFDS text dataset), 'files' (local .txt/.jsonl)
    s.tfds_name = ""
    s.tfds_data_dir = ""
    s.text_feature = "text"
    s.tfds_val_split = ""  # source='tfds': '' hash-splits 'train' by document; a split name (e.g.
    #   'validation') validates on that whole TFDS split instead (needed when 'train' is one document)
    s.files = ""  # glob for source='files'
    s.tokenizer_path = ""  # a sentencepiece .model; empty: train one on the training split
    s.cache_dir = ""  # empty: $MOE_JAX_CACHE or ~/.cache/moe_jax
    s.val_fraction = 0.05
    s.packing = "concat"
    s.shuffle_seed = 0
    s.worker_count = 0
    s.max_val_windows = 256
    s.shards = 0  # training-data shards (0: one per JAX process). Fixes the global batch's rows whatever the
    #   process count: process p of N reads shards [p * shards / N, (p + 1) * shards / N); see data/pipeline.py
    s.test_fraction = 0.0  # > 0: a hash-chosen test split of whole documents (moe_jax/studies reports on it)
    s.val_window_sampling = "first"  # 'first' max_val_windows windows, or 'even': spread evenly over the split
    return s


def mesh_section() -> ml_collections.ConfigDict:
    """`config.mesh`: the device mesh (defaults)."""
    s = ml_collections.ConfigDict()
    s.shape = (-1, 1, 1)
    s.dcn_shape = (1, 1, 1)  # slices/hosts per axis over the slow links (DCN); mesh = shape * dcn_shape per
    #   axis, shape then being one slice's (ICI) shape. Only 'data' may be > 1 (sharding.DCN_MESH_AXES)
    s.axes = MESH_AXES
    s.fsdp = False  # fully sharded data parallelism (ZeRO-3): every parameter and its optimizer state split over
    #   the data-parallel devices ('data' x 'expert'; sharding.FSDP_PARAM_RULES), weights gathered per layer, and
    #   Muon's Newton-Schulz spread over the devices (each orthogonalises 1/N of the matrices whole)
    return s


def base_config() -> ml_collections.ConfigDict:
    """The defaults of every field, one section per function."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.name = "moe"
    c.model = model_section()
    c.moe = moe_section()
    c.optim = optim_section()
    c.train = train_section()
    c.data = data_section()
    c.mesh = mesh_section()
    return c


def moe_layer(num_experts: int, every: int, layer: int) -> bool:
    """Whether transformer layer `layer` (0-based) uses the MoE feed-forward: layer % every == every - 1."""
    return num_experts > 0 and layer % every == every - 1


def is_moe_layer(config, layer: int) -> bool:
    """`moe_layer` for a ConfigDict (or anything with .moe.num_experts and .moe.every)."""
    return moe_layer(config.moe.num_experts, config.moe.every, layer)


def warmup_steps(warmup_steps_field: int, warmup_fraction: float, steps: int) -> int:
    """Warmup length: optim.warmup_steps when >= 0, else round(optim.warmup_fraction * train.steps)."""
    if warmup_steps_field >= 0:
        return int(warmup_steps_field)
    return int(round(warmup_fraction * steps))


def schedule_length(schedule_steps_field: int, steps: int) -> int:
    """Optimizer steps the warmup + cosine schedule is laid out over: optim.schedule_steps, or train.steps when 0."""
    return int(schedule_steps_field) if schedule_steps_field > 0 else int(steps)


def choices_text(options: tuple) -> str:
    """('a', 'b', 'c') -> "'a', 'b' or 'c'" (how messages list a field's allowed values)."""
    quoted = [repr(o) for o in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


from moe_jax.config.validate import validate  # noqa: E402,F401  (validate.py reads the choices above)


def torch_seed_training(o: ml_collections.ConfigDict, ns_dtype: str, schedule_steps: int) -> None:
    """Set `config.optim` `o` to the seeds' PyTorch training semantics they share (docs/decisions.md, "Seed
    fidelity"; tests/test_seed_training.py): the Newton-Schulz arithmetic in `ns_dtype` and a LambdaLR laid out over
    `schedule_steps` micro-batches."""
    o.muon_fused_qkv = True  # their qkv is one Linear [3M, M], orthogonalised whole, scaled sqrt(3)
    o.muon_bias_correction = False  # torch Muon: buf.lerp_(g, 1 - b); g.lerp_(buf, b); no 1 / (1 - b^t)
    o.decay_norms = True  # their AdamW decays every parameter it holds, norms included
    o.ns_dtype, o.ns_rounding, o.ns_method, o.ns_eps = ns_dtype, "every_op", "standard", 1e-7  # their Newton-Schulz
    o.schedule_steps = schedule_steps  # LambdaLR spans max_steps micro-batches, stepped once per optimizer step
    o.warmup_from_zero = True  # LambdaLR: lr(s) = peak * s / W, the first optimizer step at lr 0

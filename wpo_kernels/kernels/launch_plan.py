"""The one launch plan: for a call's shapes and options, every tile config, grid, vocabulary split,
chunking and workspace buffer of the forward and the backward pass.

The launchers (``forward.py``, ``backward.py``) allocate exactly the plan's buffers and launch exactly its
kernels and GEMMs; the static report and the cost model (``benchmarks/``) read the same plan. No number
here is copied anywhere else: the shipped autotune configs live beside their kernels and are read from
there (:func:`shipped_configs`).

Forward (``forward_plan``): the stats kernel runs on a 2-D grid ``(cdiv(N, BLOCK_N), vocab_splits)``;
each program folds ``split_len`` vocabulary columns into five partial statistics. With one split they are
the final statistics; with several they go to an fp32 workspace ``partial_stats [k, splits, N]`` and a
merge kernel combines them in split order (deterministic). ``vocab_splits`` is chosen so that there are at
least ``2 * sm_count`` programs for *every* shipped config (it is computed with the largest ``BLOCK_N``),
so the autotuner's choice never changes the workspace.

Backward (``backward_plan``): atomics-free. The tokens are cut into slabs of ``slab_rows`` rows, the
vocabulary into chunks of ``chunk_cols`` columns. For each (slab, chunk) the dZ kernel recomputes the
logits and writes ``dZ = g·(onehot − softmax(z))·dz/dl`` into ``grad_logits [slab_rows, chunk_cols]`` in
the parameter dtype; then cuBLAS does ``dH_slab += dZ @ W_chunk`` and ``dW_chunk += dZᵀ @ H_slab``
(and ``db_chunk += Σ_rows dZ``). Half-precision ``dH`` is summed over chunks in an fp32 slab buffer
(each chunk's product is rounded once to the parameter dtype); ``dW`` is accumulated straight into the
returned gradient (rounded once per slab) unless ``fp32_grad_accumulation`` asks for an fp32 ``[V, H]``
buffer (then each slab's product is rounded once and summed in fp32). Chunk sizes keep the workspace
within ``workspace_budget`` (64 MiB by default).

``workspace_bytes`` = what the op allocates beyond its inputs, its saved / returned ``O(N)`` statistics
and the gradients it returns in the parameters' dtype.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

#: Default cap on the backward's workspace (bytes), excluding the optional fp32 ``[V, H]`` dW buffer.
WORKSPACE_BUDGET = 64 * 2**20
#: Largest token slab of the backward (rows): a bigger one only grows the fp32 dH slab.
MAX_SLAB_ROWS = 2048
#: Largest vocabulary chunk of the backward (columns).
MAX_CHUNK_COLS = 16384
#: Row blocks per group of the forward's program order (see :class:`KernelLaunch`): a wave of 132
#: programs then reads ~8 hidden-state blocks (8 MB for 128 × 4096 bf16) and ~17 weight tiles, which
#: stay in a 50 MB L2; ungrouped, a wave at N = 16k would hold ~128 MB of hidden states.
GROUP_ROWS = 8
#: Tokens per program of the merge kernel (a 1-D elementwise pass over ``[k, splits, N]``).
MERGE_BLOCK = 256
#: Shared memory one block may use on sm_90 (227 KiB).
MAX_SHARED_BYTES = 232_448
#: "SMs" assumed off-GPU (the interpreter runs programs one at a time); small, so that the default test
#: shapes already exercise the vocabulary split.
CPU_SM_COUNT = 2


@dataclass(frozen=True)
class TileConfig:
    """One kernel tile: ``BLOCK_N`` tokens × ``BLOCK_V`` vocabulary columns, ``BLOCK_D`` hidden units per
    ``tl.dot`` step, and Triton's ``num_warps`` / ``num_stages``."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict[str, int]:
        """The constexpr block sizes as kernel keyword arguments."""
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d}

    def shared_bytes(self, dtype: torch.dtype) -> int:
        """Shared memory of the H/W tile pipeline: ``num_stages`` × (``BLOCK_N`` + ``BLOCK_V``) ×
        ``BLOCK_D`` operands of ``dtype`` (what ptxas reports for these kernels on sm_90)."""
        return self.num_stages * (self.block_n + self.block_v) * self.block_d * dtype.itemsize


def launchable(configs: tuple[TileConfig, ...], dtype: torch.dtype) -> tuple[TileConfig, ...]:
    """The configs whose pipeline fits :data:`MAX_SHARED_BYTES` for operands of ``dtype`` (fp32 with
    tf32 doubles the bf16 figure: the 4-stage 64×256 config does not fit)."""
    return tuple(c for c in configs if c.shared_bytes(dtype) <= MAX_SHARED_BYTES)


def prune_to_launchable(configs: list, named_args: dict, **kwargs: object) -> list:
    """``triton.autotune`` early-config-prune hook: drop the ``triton.Config`` s that
    :func:`launchable` drops for the dtype of the kernel's ``H_ptr``."""
    dtype = named_args["H_ptr"].dtype
    return [
        c for c in configs
        if TileConfig(
            c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages
        ).shared_bytes(dtype) <= MAX_SHARED_BYTES
    ]


@dataclass(frozen=True)
class Buffer:
    """A workspace tensor the launcher allocates: ``name``, ``shape``, ``dtype``."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def empty(self, device: torch.device | str) -> torch.Tensor:
        """Allocate it (uninitialised) on ``device``."""
        return torch.empty(self.shape, dtype=self.dtype, device=device)


@dataclass(frozen=True)
class KernelLaunch:
    """``count`` launches of the Triton kernel ``kernel_name`` on ``grid``.

    ``configs`` are the candidates the autotuner picks from on a GPU (one, the fixed config, in the
    interpreter); ``config`` is the one the grid was computed with (``configs[0]`` unless the caller
    named one). ``switches`` are the constexpr switches of the launch (``HAS_BIAS``, ...).

    Program order: with ``group_rows == 0`` the grid is 2-D and axis 0 varies fastest. The forward's 1-D
    grid is grouped (``group_rows = G``, the Triton matmul tutorial's ``GROUP_SIZE_M``): program ``p``
    of ``rows × splits`` takes, within its group of ``G`` row blocks (``g`` in the last, short group),
    row block ``first + (p mod G·splits) mod g`` and split ``(p mod G·splits) div g``; a wave of programs
    thus covers about ``G`` row blocks' hidden states and ``wave / G`` splits' weight tiles.
    """

    kernel_name: str
    grid: tuple[int, ...]
    config: TileConfig
    configs: tuple[TileConfig, ...]
    switches: dict[str, object] = field(default_factory=dict)
    count: int = 1
    group_rows: int = 0

    @property
    def programs(self) -> int:
        """Programs per launch."""
        return math.prod(self.grid)


@dataclass(frozen=True)
class Gemm:
    """``count`` cuBLAS GEMMs ``[m, k] @ [k, n]`` on operands of ``dtype`` (the backward's dH/dW)."""

    name: str
    m: int
    n: int
    k: int
    count: int
    dtype: torch.dtype

    @property
    def flops(self) -> int:
        return 2 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class PassPlan:
    """Everything one pass (``"forward"`` / ``"backward"``) launches and allocates for one call.

    Forward: ``vocab_splits`` / ``split_len``; backward: ``slab_rows`` / ``chunk_cols`` (0 where not
    applicable). ``launches[0]`` is the main kernel; ``programs`` is its programs per launch.
    """

    pass_name: str
    n: int
    v: int
    h: int
    dtype: torch.dtype
    sm_count: int
    launches: tuple[KernelLaunch, ...]
    gemms: tuple[Gemm, ...]
    buffers: tuple[Buffer, ...]
    vocab_splits: int = 1
    split_len: int = 0
    slab_rows: int = 0
    chunk_cols: int = 0

    @property
    def workspace_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @property
    def programs(self) -> int:
        return self.launches[0].programs if self.launches else 0

    def buffer(self, name: str) -> Buffer | None:
        """The buffer called ``name``, None if this plan has none."""
        return next((b for b in self.buffers if b.name == name), None)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def n_bucket(n: int) -> int:
    """The autotune key's token bucket: the next power of two of ``n``, within [64, 16384]."""
    return min(max(64, 1 << max(n - 1, 0).bit_length()), 16384)


def device_sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; :data:`CPU_SM_COUNT` elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def shipped_configs(kernel_name: str, interpreter: bool) -> tuple[TileConfig, ...]:
    """The autotune candidates of ``kernel_name`` (``"vocab_stats"`` or ``"grad_logits"``) as shipped
    beside the kernel, or its single interpreter config."""
    # imported here: the kernel modules import this one for the plan
    from wpo_kernels.kernels import backward, forward

    module = {"vocab_stats": forward, "grad_logits": backward}[kernel_name]
    return (module.INTERPRETER_CONFIG,) if interpreter else module.GPU_CONFIGS


def _candidates(
    kernel_name: str, interpreter: bool, config: TileConfig | None, dtype: torch.dtype
) -> tuple[TileConfig, ...]:
    if config is not None:
        return (config,)
    configs = shipped_configs(kernel_name, interpreter)
    return configs if interpreter else launchable(configs, dtype)


def forward_plan(
    n: int,
    v: int,
    h: int,
    dtype: torch.dtype,
    *,
    has_bias: bool,
    has_softcap: bool,
    need_mean: bool,
    sm_count: int,
    interpreter: bool = False,
    config: TileConfig | None = None,
    vocab_splits: int | None = None,
) -> PassPlan:
    """The forward pass of ``N`` tokens against a ``[V, H]`` head (or vocabulary slice) of ``dtype``.

    ``config`` pins one tile config (default: the shipped candidates; the grid is reported for the
    first); ``vocab_splits`` overrides the split count (tests use it to force many splits). Launches:
    ``vocab_stats`` on ``(cdiv(N, BLOCK_N), splits)``, then ``merge_vocab_stats`` on
    ``(cdiv(N, MERGE_BLOCK),)`` when ``splits > 1``. Buffers: ``partial_stats [k, splits, N]`` fp32
    (``k`` = 5 with the mean logit, else 4) when ``splits > 1``; none otherwise.
    """
    configs = _candidates("vocab_stats", interpreter, config, dtype)
    # split granularity: a multiple of every candidate's BLOCK_V, so no split starts mid-tile
    granule = math.lcm(*(c.block_v for c in configs))
    if vocab_splits is None:
        splits = _choose_vocab_splits(n, v, configs, granule, sm_count)
    else:
        splits = max(1, vocab_splits)
    split_len = _round_up(cdiv(v, splits), granule)
    splits = cdiv(v, split_len)
    switches = {"HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap, "NEED_MEAN": need_mean}
    rows = cdiv(n, configs[0].block_n)
    main = KernelLaunch(
        "vocab_stats", (rows * splits,), configs[0], configs, switches, group_rows=min(GROUP_ROWS, rows)
    )
    launches: tuple[KernelLaunch, ...] = (main,)
    buffers: tuple[Buffer, ...] = ()
    if splits > 1:
        k = 5 if need_mean else 4
        merge_config = TileConfig(MERGE_BLOCK, 1, 1, num_warps=4, num_stages=1)
        merge = KernelLaunch(
            "merge_vocab_stats", (cdiv(n, MERGE_BLOCK),), merge_config, (merge_config,),
            {"NEED_MEAN": need_mean},
        )
        launches = (main, merge)
        buffers = (Buffer("partial_stats", (k, splits, n), torch.float32),)
    return PassPlan(
        "forward", n, v, h, dtype, sm_count, launches, (), buffers, vocab_splits=splits, split_len=split_len
    )


def backward_plan(
    n: int,
    v: int,
    h: int,
    dtype: torch.dtype,
    *,
    has_bias: bool,
    has_softcap: bool,
    sm_count: int,
    interpreter: bool = False,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    grad_hidden_fp32: bool = False,
    fp32_grad_accumulation: bool = False,
    config: TileConfig | None = None,
    slab_rows: int | None = None,
    chunk_cols: int | None = None,
    workspace_budget: int = WORKSPACE_BUDGET,
) -> PassPlan:
    """The atomics-free backward of ``N`` tokens against a ``[V, H]`` head (or slice) of ``dtype``.

    ``grad_hidden_fp32``: the caller wants ``dH`` in fp32 (the vocabulary-parallel path sums it across
    ranks before rounding), so it accumulates in that returned tensor and needs no slab buffer.
    ``fp32_grad_accumulation``: ``dW`` (and ``db``) accumulate over slabs in fp32 and are rounded once
    (an extra fp32 ``[V, H]`` buffer, outside ``workspace_budget``). ``slab_rows`` / ``chunk_cols``
    override the chunking (tests force many slabs and chunks with them).

    Buffers (half-precision parameters; fp32 parameters accumulate in the returned gradients and need
    only ``grad_logits``):
    ``grad_logits [slab_rows, chunk_cols]`` (dtype); ``grad_hidden_slab [slab_rows, H]`` fp32 and
    ``grad_hidden_chunk [slab_rows, H]`` (dtype) for dH; ``grad_bias_chunk [chunk_cols]`` fp32 and
    ``grad_bias_fp32 [V]`` fp32 with a bias; ``grad_weight_chunk [chunk_cols, H]`` (dtype, within the
    budget) and ``grad_weight_fp32 [V, H]`` fp32 (outside it) with ``fp32_grad_accumulation``.
    """
    configs = _candidates("grad_logits", interpreter, config, dtype)
    half = dtype != torch.float32
    granule_n = math.lcm(*(c.block_n for c in configs))
    granule_v = math.lcm(*(c.block_v for c in configs))
    nc = slab_rows or min(_round_up(max(n, 1), granule_n), MAX_SLAB_ROWS)
    per_slab = []  # buffers whose size does not depend on chunk_cols
    if need_grad_hidden and half:
        if not grad_hidden_fp32:
            per_slab.append(Buffer("grad_hidden_slab", (nc, h), torch.float32))
        per_slab.append(Buffer("grad_hidden_chunk", (nc, h), dtype))
    if has_bias and half:
        per_slab.append(Buffer("grad_bias_fp32", (v,), torch.float32))
    if chunk_cols is None:
        fixed = sum(b.nbytes for b in per_slab)
        exact_dw = fp32_grad_accumulation and half and need_grad_weight
        per_col = nc * dtype.itemsize + (4 if has_bias else 0) + (h * dtype.itemsize if exact_dw else 0)
        fit = (workspace_budget - fixed) // per_col // granule_v * granule_v
        chunk_cols = max(granule_v, min(fit, MAX_CHUNK_COLS, _round_up(v, granule_v)))
    vc = chunk_cols
    buffers = [Buffer("grad_logits", (nc, vc), dtype), *per_slab]
    if has_bias:
        buffers.append(Buffer("grad_bias_chunk", (vc,), torch.float32))
    if fp32_grad_accumulation and half and need_grad_weight:
        buffers.append(Buffer("grad_weight_chunk", (vc, h), dtype))
        buffers.append(Buffer("grad_weight_fp32", (v, h), torch.float32))

    blocks = Counter(
        (min(nc, n - n0), min(vc, v - v0)) for n0 in range(0, n, nc) for v0 in range(0, v, vc)
    )
    switches = {"HAS_BIAS": has_bias, "HAS_SOFTCAP": has_softcap}
    cfg = configs[0]
    launches = tuple(
        KernelLaunch(
            "grad_logits", (cdiv(rows, cfg.block_n), cdiv(cols, cfg.block_v)), cfg, configs, switches, count
        )
        for (rows, cols), count in blocks.items()
    )
    gemms: list[Gemm] = []
    for (rows, cols), count in blocks.items():
        if need_grad_hidden:
            gemms.append(Gemm("grad_hidden", rows, h, cols, count, dtype))
        if need_grad_weight:
            gemms.append(Gemm("grad_weight", cols, h, rows, count, dtype))
    return PassPlan(
        "backward", n, v, h, dtype, sm_count, launches, tuple(gemms), tuple(buffers),
        slab_rows=nc, chunk_cols=vc,
    )


def _choose_vocab_splits(
    n: int, v: int, configs: tuple[TileConfig, ...], granule: int, sm_count: int
) -> int:
    """The vocabulary split count of the forward.

    At least: ``2 * sm_count`` programs for every candidate config (the largest ``BLOCK_N`` decides),
    and ``cdiv(sm_count, GROUP_ROWS)`` splits when there are more row blocks than a group, so that a
    wave of grouped programs spans few row blocks. Among up to four times that minimum, the count whose
    worst candidate, at 1 or 2 resident programs per SM, loses least to wave quantisation
    (``ceil(programs / wave)`` waves of ``ceil(split_len / BLOCK_V)`` tiles, relative to the ideal
    ``rows·V / (wave·BLOCK_V)``).
    """
    most = cdiv(v, granule)
    rows_min = cdiv(max(n, 1), max(c.block_n for c in configs))
    least = cdiv(2 * sm_count, rows_min)
    if rows_min > GROUP_ROWS:
        least = max(least, cdiv(sm_count, GROUP_ROWS))
    least = min(least, most)

    def actual(splits: int) -> int:
        return cdiv(v, _round_up(cdiv(v, splits), granule))

    def loss(splits: int) -> float:
        s, split_len = actual(splits), _round_up(cdiv(v, splits), granule)
        worst = 0.0
        for c in configs:
            rows = cdiv(max(n, 1), c.block_n)
            for wave in (sm_count, 2 * sm_count):  # 1 or 2 resident programs per SM
                steps = cdiv(rows * s, wave) * cdiv(split_len, c.block_v)
                worst = max(worst, steps * wave * c.block_v / (rows * v))
        return worst

    enough = [s for s in range(least, min(4 * least, most) + 1) if rows_min * actual(s) >= 2 * sm_count]
    return min(enough, key=lambda s: (loss(s), s)) if enough else most


def _round_up(x: int, multiple: int) -> int:
    return cdiv(x, multiple) * multiple


# --- the paired training step (fused_linear_wpo_loss with gradients, Triton backend) ---------------------

#: ``memory_budget`` when the caller gives None (bytes): 2 GiB. On one 80 GB H100 that is 2.5% of the
#: memory, and holds one-pass chunks of ~8k kept tokens of a Llama-3 head (V = 128256, bf16) or ~4k of a
#: Gemma-2 head (V = 256000): every pair of TRL's default ``max_length=1024`` fits in one pass.
DEFAULT_MEMORY_BUDGET = 2 * 2**30
#: Rows per slab of the recompute route: the gathered hidden rows and their dH live one slab at a time.
RECOMPUTE_SLAB_ROWS = MAX_SLAB_ROWS
#: The step's routes: a chunk of whole pairs held as ``[rows, V]`` logits, or today's recompute kernels.
ROUTES = ("one_pass", "recompute")


def pair_groups(offsets: list[int], rows: int) -> list[tuple[int, int, bool]]:
    """Consecutive pairs grouped greedily into chunks of at most ``rows`` kept tokens.

    ``offsets`` (``2B + 1``) are the pair-major prefix sums of the sequences' kept tokens (see
    :mod:`wpo_kernels.pair_layout`). Returns ``(first, last, fits)`` per group of pairs
    ``[first, last)``: ``fits`` is False for a pair longer than ``rows`` (alone in its group).
    """
    groups, pair, n_pairs = [], 0, (len(offsets) - 1) // 2
    while pair < n_pairs:
        last = pair + 1
        while last < n_pairs and offsets[2 * last + 2] - offsets[2 * pair] <= rows:
            last += 1
        groups.append((pair, last, offsets[2 * last] - offsets[2 * pair] <= rows))
        pair = last
    return groups


@dataclass(frozen=True)
class StepChunk:
    """Pairs ``[first_pair, last_pair)``, kept tokens ``[start, stop)`` (pair-major), on ``route``."""

    route: str
    first_pair: int
    last_pair: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def slabs(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each recompute slab of this chunk (one, the chunk, on the one-pass route)."""
        if self.route == "one_pass":
            return [(self.start, self.stop)]
        step = RECOMPUTE_SLAB_ROWS
        return [(s, min(s + step, self.stop)) for s in range(self.start, self.stop, step)]


@dataclass(frozen=True)
class StepPlan:
    """Everything the paired step allocates and launches for one batch.

    ``chunk_rows``: the most kept tokens a one-pass chunk may hold under ``memory_budget``; ``chunks`` in
    order; ``buffers``: the step's own workspace (allocated once); ``recompute``: the ``(forward,
    backward)`` plans of each recompute slab, whose launchers allocate their workspace (and their ``[4,
    S]`` statistics and ``[S, H]`` dH) per slab. ``workspace_bytes`` is the peak: the buffers plus the
    largest slab's transient bytes (``transient_bytes``: its statistics, dH and launch workspaces).
    """

    v: int
    h: int
    dtype: torch.dtype
    sm_count: int
    memory_budget: int
    chunk_rows: int
    chunks: tuple[StepChunk, ...]
    buffers: tuple[Buffer, ...]
    recompute: tuple[tuple[PassPlan, PassPlan], ...]
    transient_bytes: int = 0
    need_grad_hidden: bool = True
    need_grad_weight: bool = True
    need_grad_bias: bool = False

    @property
    def kept(self) -> int:
        return sum(c.rows for c in self.chunks)

    @property
    def routes(self) -> tuple[str, ...]:
        """The routes the chunks take, in :data:`ROUTES` order."""
        return tuple(r for r in ROUTES if any(c.route == r for c in self.chunks))

    @property
    def workspace_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers) + self.transient_bytes

    def buffer(self, name: str) -> Buffer | None:
        """The buffer called ``name``, None if this plan has none."""
        return next((b for b in self.buffers if b.name == name), None)


def one_pass_row_bytes(v: int, h: int, dtype: torch.dtype, need_grad_hidden: bool) -> int:
    """Workspace bytes per kept token of a one-pass chunk: its logits row, its gathered hidden row (and
    dH row), its target, log-sum-exp and coefficient."""
    return (v + h * (2 if need_grad_hidden else 1)) * dtype.itemsize + 8 + 4 + 4


def step_plan(
    offsets: list[int],
    v: int,
    h: int,
    dtype: torch.dtype,
    *,
    memory_budget: int,
    has_bias: bool,
    has_softcap: bool,
    sm_count: int,
    interpreter: bool = False,
    need_grad_hidden: bool = True,
    need_grad_weight: bool = True,
    need_grad_bias: bool = False,
) -> StepPlan:
    """The paired step of a batch whose kept tokens have pair-major prefix sums ``offsets``.

    One-pass chunks hold ``chunk_rows = (memory_budget − fixed) // one_pass_row_bytes`` kept tokens at
    most (fixed: the per-sequence coefficients and the fp32 bias-gradient accumulators); pairs longer than
    that form recompute chunks (consecutive ones merged), walked in slabs of ``RECOMPUTE_SLAB_ROWS``.
    Buffers: ``logits [R, V]``, ``hidden_rows [R, H]``, ``grad_hidden_rows [R, H]`` (with dH, in ``dtype``),
    ``row_targets [R]`` int64, ``row_lse`` / ``row_coefficient [R]`` fp32 (``R`` the largest one-pass
    chunk); ``sequence_coefficient [2B]`` fp32; with a bias gradient ``grad_bias_chunk [V]`` fp32 and,
    for half precision, ``grad_bias_fp32 [V]``; with recompute chunks ``recompute_hidden_rows [S, H]``,
    ``recompute_targets [S]``, ``recompute_coefficient [S]`` and ``recompute_lse [Rc]`` (``S`` the
    largest slab, ``Rc`` the largest recompute chunk).
    """
    fixed = [Buffer("sequence_coefficient", (len(offsets) - 1,), torch.float32)]
    if need_grad_bias:
        fixed.append(Buffer("grad_bias_chunk", (v,), torch.float32))
        if dtype != torch.float32:
            fixed.append(Buffer("grad_bias_fp32", (v,), torch.float32))
    spare = memory_budget - sum(b.nbytes for b in fixed)
    chunk_rows = max(0, spare // one_pass_row_bytes(v, h, dtype, need_grad_hidden))
    chunks: list[StepChunk] = []
    for first, last, fits in pair_groups(offsets, chunk_rows):
        route = "one_pass" if fits else "recompute"
        if route == "recompute" and chunks and chunks[-1].route == "recompute":
            first = chunks.pop().first_pair  # consecutive long pairs: one recompute chunk
        chunks.append(StepChunk(route, first, last, offsets[2 * first], offsets[2 * last]))
    buffers = fixed + _one_pass_buffers(chunks, v, h, dtype, need_grad_hidden)
    slabs = Counter(stop - start for c in chunks if c.route == "recompute" for start, stop in c.slabs())
    recompute = []
    if slabs:
        s = max(slabs)
        buffers += [
            Buffer("recompute_hidden_rows", (s, h), dtype),
            Buffer("recompute_targets", (s,), torch.int64),
            Buffer("recompute_coefficient", (s,), torch.float32),
            Buffer("recompute_lse", (max(c.rows for c in chunks if c.route == "recompute"),), torch.float32),
        ]
        common = {
            "has_bias": has_bias, "has_softcap": has_softcap, "sm_count": sm_count, "interpreter": interpreter
        }
        grads = {"need_grad_hidden": need_grad_hidden, "need_grad_weight": need_grad_weight}
        recompute = [
            (
                forward_plan(n, v, h, dtype, need_mean=False, **common),
                backward_plan(n, v, h, dtype, **grads, **common),
            )
            for n in sorted(slabs)
        ]
    # per recompute slab: the forward's [4, S] fp32 statistics and the backward's [S, H] dH, and the plans'
    transient = max(
        (
            fwd.n * 16 + need_grad_hidden * fwd.n * h * dtype.itemsize + fwd.workspace_bytes
            + bwd.workspace_bytes
            for fwd, bwd in recompute
        ),
        default=0,
    )
    return StepPlan(
        v, h, dtype, sm_count, memory_budget, chunk_rows, tuple(chunks), tuple(buffers), tuple(recompute),
        transient, need_grad_hidden, need_grad_weight, need_grad_bias,
    )


def _one_pass_buffers(
    chunks: list[StepChunk], v: int, h: int, dtype: torch.dtype, need_grad_hidden: bool
) -> list[Buffer]:
    rows = max((c.rows for c in chunks if c.route == "one_pass"), default=0)
    if rows == 0:
        return []
    buffers = [Buffer("logits", (rows, v), dtype), Buffer("hidden_rows", (rows, h), dtype)]
    if need_grad_hidden:
        buffers.append(Buffer("grad_hidden_rows", (rows, h), dtype))
    return buffers + [
        Buffer("row_targets", (rows,), torch.int64),
        Buffer("row_lse", (rows,), torch.float32),
        Buffer("row_coefficient", (rows,), torch.float32),
    ]

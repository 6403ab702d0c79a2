"""Analytic H100 SXM cost model of a launch plan: predicted time of a pass, and the ratio to cuBLAS.

Everything the model knows about *our* launches comes from a :class:`~wpo_kernels.kernels.launch_plan.
PassPlan` (grids, tile configs, vocabulary split, chunking, GEMMs, workspace buffers); everything it knows
about the *GPU* is in :class:`Hopper`, whose defaults are the assumptions of ``../shared/HOPPER_STATIC.md``
(a static analysis made without a GPU). Nothing here is a measurement: every output is a prediction that
the first GPU session checks (``benchmarks/NOTES.md`` lists them).

Per kernel kind (the plan's ``kernel_name``):

- ``vocab_stats`` (forward): programs run in waves of ``sm_count × CTAs/SM``, each sweeping its vocabulary
  span tile by tile. Per tile and SM: MMA at ``eta_forward`` of the SM's peak, the statistics epilogue
  (its SASS instruction count per logit from the compiled kernel when the static facts are given; fully
  exposed at 1 CTA/SM, ``epilogue_exposed_2cta`` at 2+), a pipeline refill. A wave takes the larger
  of that compute and its HBM traffic (a program's H block is re-read from HBM at every tile when the
  wave's H blocks plus its W tiles do not fit L2; each W tile is read once per wave).
- ``merge_vocab_stats``: memory bound (reads the partial statistics, writes the final ones).
- ``grad_logits`` (atomics-free backward): one logits tile per program, like one forward step, plus the
  dZ tile written in the parameter dtype; then the plan's cuBLAS GEMMs at ``cublas_flops``.
- ``fused_backward`` (the kernel of commit eafe6c5, see ``benchmarks/legacy_plans.py``): three tile
  GEMMs at ``eta_backward`` plus fp32 atomic adds of every tile into dH and dW; ``acq_rel`` atomics
  serialise per warp (a round trip each), ``relaxed`` ones are limited by L2 atomic throughput and, when
  their target does not fit L2, by HBM traffic.

The backward's extra HBM traffic (dZ chunks written once and read by both GEMMs, dW read-modify-write per
token slab, the fp32 dH slab accumulation, zero-fill and final cast of fp32 buffers) is *added* to the
compute time, not overlapped: conservative. Each kernel launch or cuBLAS call costs ``launch_s``.

``predicted_ratio`` = predicted time ÷ one cuBLAS GEMM ``2·N·V·H / cublas_flops`` (forward) or ÷ three
(backward). A launch with several autotune candidates is predicted with the candidate the model finds
fastest (what the autotuner converges to).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wpo_kernels.kernels.launch_plan import Gemm, KernelLaunch, PassPlan, StepPlan, TileConfig, cdiv


@dataclass(frozen=True)
class Hopper:
    """H100 SXM figures. Defaults: ``../shared/HOPPER_STATIC.md``'s assumptions, except where a comment
    says otherwise (with the reason)."""

    sm_count: int = 132
    peak_flops: float = 989e12  # dense bf16 tensor-core peak
    flops_per_clock_per_sm: int = 4096  # -> implied clock peak_flops / (sm_count * 4096) = 1.83 GHz
    hbm_bytes_per_s: float = 3.35e12 * 0.9
    l2_bytes: float = 50e6  # treated as LRU: a working set larger than this misses
    cublas_flops: float = 700e12  # cuBLAS bf16 GEMM on large shapes
    eta_forward: float = 0.70  # Triton main loop, fraction of the SM's peak (range 0.6-0.8)
    eta_backward: float = 0.60  # the fused backward: its wgmma wait after each dot
    epilogue_exposed_2cta: float = 0.30  # share of the epilogue not hidden by a co-resident CTA
    refill_s: float = 0.5e-6  # cp.async pipeline refill per vocabulary tile
    issue_per_clock: int = 4  # warp instructions per clock per SM (4 schedulers)
    mufu_per_clock: int = 16  # MUFU (exp, reciprocal) thread-ops per clock per SM
    l2_slices: int = 100
    l2_clock_hz: float = 1.75e9
    relaxed_adds_per_slice_clock: float = 4.0  # v4 reds; 1 pessimistic, 8 optimistic
    fenced_round_trip_hit_s: float = 0.25e-6  # acq_rel atomic, serialised per warp, L2 hit
    fenced_round_trip_miss_s: float = 0.5e-6
    # Not in HOPPER_STATIC (its tables have one launch per pass): the chunked backward makes several
    # launches and cuBLAS calls per (slab, chunk), so each costs a typical H100 launch gap, a prediction.
    launch_s: float = 4e-6
    # Occupancy limits (sm_90): registers and shared memory per SM, shared memory reserved per CTA.
    registers_per_sm: int = 65536
    shared_per_sm: int = 233472
    shared_reserved_per_cta: int = 1024

    @property
    def clock_hz(self) -> float:
        return self.peak_flops / (self.sm_count * self.flops_per_clock_per_sm)

    @property
    def sm_flops(self) -> float:
        return self.peak_flops / self.sm_count


H100 = Hopper()


@dataclass(frozen=True)
class Epilogue:
    """Per-logit cost of a kernel's epilogue: SASS instructions and MUFU operations (per thread)."""

    instructions: float
    mufu: float


#: Epilogue costs when a kernel's compiled facts are not given: HOPPER_STATIC's SASS counts for the
#: eafe6c5 forward (five statistics without / with the softcap; MUFU per logit counted the same way, see
#: ``launch_compile.epilogue_counts``, which reproduces both instruction counts) ...
STATS_EPILOGUE = {False: Epilogue(25.6, 1.0), True: Epilogue(42.7, 3.0)}
#: ... and, for the dZ kernel, HOPPER_STATIC's LSE-only forward epilogue (14.3 / 31.5), an assumption.
GRAD_EPILOGUE = {False: Epilogue(14.3, 1.0), True: Epilogue(31.5, 3.0)}


@dataclass(frozen=True)
class CompiledKernel:
    """Static facts of one compiled variant: registers per thread, shared bytes per CTA, epilogue cost
    per logit (None: not counted)."""

    registers: int
    shared_bytes: int
    epilogue: Epilogue | None = None


@dataclass(frozen=True)
class KernelFacts:
    """Compiled facts per ``(kernel_name, TileConfig)``, each with the constexpr switches it was compiled
    with (the static report's entries). A launch takes the entries whose switches agree with its own
    (the worst of them), else the worst entry of its config; a config without facts runs at 1 CTA/SM
    (its epilogue fully exposed, the conservative choice) with the default epilogue cost."""

    entries: Mapping[tuple[str, TileConfig], list[tuple[dict[str, object], CompiledKernel]]] = field(
        default_factory=dict
    )

    def lookup(
        self, kernel_name: str, config: TileConfig, switches: Mapping[str, object]
    ) -> CompiledKernel | None:
        compiled = self.entries.get((kernel_name, config), [])
        agreeing = [c for s, c in compiled if all(s.get(k) == v for k, v in switches.items())]
        candidates = agreeing or [c for _, c in compiled]
        if not candidates:
            return None
        epilogues = [c.epilogue for c in candidates if c.epilogue is not None]
        return CompiledKernel(
            max(c.registers for c in candidates),
            max(c.shared_bytes for c in candidates),
            max(epilogues, key=lambda e: e.instructions) if epilogues else None,
        )

    def ctas_per_sm(
        self, kernel_name: str, config: TileConfig, switches: Mapping[str, object] | None = None,
        hw: Hopper = H100,
    ) -> int:
        compiled = self.lookup(kernel_name, config, switches or {})
        if compiled is None:
            return 1
        per_warp = math.ceil(compiled.registers / 8) * 8 * 32  # allocated in units of 8 per thread
        by_registers = hw.registers_per_sm // (per_warp * config.num_warps)
        by_shared = hw.shared_per_sm // (compiled.shared_bytes + hw.shared_reserved_per_cta)
        return max(1, min(by_registers, by_shared))

    def epilogue(
        self, kernel_name: str, config: TileConfig, switches: Mapping[str, object], default: Epilogue
    ) -> Epilogue:
        compiled = self.lookup(kernel_name, config, switches)
        return compiled.epilogue if compiled is not None and compiled.epilogue is not None else default


@dataclass
class Prediction:
    """Predicted seconds of one pass, its cuBLAS floor and their ratio; ``parts`` splits the seconds by
    cause and ``configs`` names the tile config chosen for each Triton kernel."""

    seconds: float
    floor_seconds: float
    parts: dict[str, float]
    configs: dict[str, TileConfig]

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor_seconds


def gemm_floor(plan: PassPlan, hw: Hopper = H100) -> float:
    """One cuBLAS head GEMM (forward) or three (backward): ``k · 2·N·V·H / cublas_flops``."""
    gemms = 1 if plan.pass_name == "forward" else 3
    return gemms * 2 * plan.n * plan.v * plan.h / hw.cublas_flops


def predict(plan: PassPlan, hw: Hopper = H100, facts: KernelFacts | None = None) -> Prediction:
    """Predicted H100 time of ``plan`` (see the module docstring for the model); ``facts``: the compiled
    kernels' registers, shared memory and epilogue counts (the static report's)."""
    facts = facts or KernelFacts()
    parts: dict[str, float] = {}
    configs: dict[str, TileConfig] = {}
    for name, group in _by_kernel(plan.launches).items():

        def seconds(config: TileConfig, group: list[KernelLaunch] = group) -> float:
            return sum(_launch_seconds(plan, launch, config, hw, facts) for launch in group)

        configs[name] = min(group[0].configs, key=seconds)
        parts[name] = seconds(configs[name])
    if plan.gemms:
        parts["cublas"] = sum(_gemm_seconds(g, hw) for g in plan.gemms)
    parts["extra_traffic"] = _extra_traffic_bytes(plan) / hw.hbm_bytes_per_s
    parts["launches"] = hw.launch_s * (
        sum(l.count for l in plan.launches) + sum(g.count for g in plan.gemms) + _elementwise_launches(plan)
    )
    return Prediction(sum(parts.values()), gemm_floor(plan, hw), parts, configs)


def _by_kernel(launches: tuple[KernelLaunch, ...]) -> dict[str, list[KernelLaunch]]:
    groups: dict[str, list[KernelLaunch]] = {}
    for launch in launches:
        groups.setdefault(launch.kernel_name, []).append(launch)
    return groups


def _launch_seconds(
    plan: PassPlan, launch: KernelLaunch, config: TileConfig, hw: Hopper, facts: KernelFacts
) -> float:
    kind = launch.kernel_name
    if kind == "merge_vocab_stats":
        return launch.count * _merge_seconds(plan, hw)
    ctas = facts.ctas_per_sm(kind, config, launch.switches, hw)
    softcap = bool(launch.switches.get("HAS_SOFTCAP"))
    if kind == "vocab_stats":
        epilogue = facts.epilogue(kind, config, launch.switches, STATS_EPILOGUE[softcap])
        return launch.count * _sweep_seconds(plan, launch, config, ctas, epilogue, hw)
    if kind == "grad_logits":
        epilogue = facts.epilogue(kind, config, launch.switches, GRAD_EPILOGUE[softcap])
        return launch.count * _grad_logits_seconds(plan, launch, config, ctas, epilogue, hw)
    if kind == "fused_backward":
        return launch.count * _fused_backward_seconds(plan, launch, config, ctas, hw)
    raise ValueError(f"the cost model has no rule for kernel {kind!r}")


def _grid(plan: PassPlan, launch: KernelLaunch, config: TileConfig) -> tuple[int, int, int]:
    """``(row blocks, column blocks, group rows)`` of ``launch`` run with ``config``: the forward's
    ``rows × splits`` programs in the plan's grouped order, or a 2-D grid (stated in the plan for
    ``launch.config``) whose axis 0 varies fastest, i.e. one group of all rows."""
    if launch.kernel_name == "vocab_stats":
        rows = cdiv(plan.n, config.block_n)
        return rows, plan.vocab_splits, launch.group_rows or rows
    rows, cols = launch.grid
    rows = cdiv(rows * launch.config.block_n, config.block_n)
    cols = cdiv(cols * launch.config.block_v, config.block_v)
    return rows, cols, rows


@functools.cache
def _waves(rows: int, cols: int, group: int, per_wave: int) -> tuple[tuple[int, int, int], ...]:
    """``(programs, distinct row blocks, distinct column blocks)`` of each wave of ``per_wave`` programs,
    programs ordered as ``launch_plan.KernelLaunch`` states: groups of ``group`` row blocks × all
    columns, row block fastest within a group."""
    per_group = group * cols
    waves = []
    for start in range(0, rows * cols, per_wave):
        row_ids, col_ids = set(), set()
        for p in range(start, min(start + per_wave, rows * cols)):
            first = p // per_group * group
            here = min(rows - first, group)
            row_ids.add(first + p % per_group % here)
            col_ids.add(p % per_group // here)
        waves.append((min(per_wave, rows * cols - start), len(row_ids), len(col_ids)))
    return tuple(waves)


def _tile_step_seconds(
    config: TileConfig, h: int, ctas: int, eta: float, epilogue: Epilogue | None, hw: Hopper
) -> float:
    """One vocabulary tile on one SM with ``ctas`` co-resident CTAs: their MMAs share the tensor cores,
    their epilogues hide ``1 - epilogue_exposed_2cta`` of each other, plus one pipeline refill."""
    mma = 2 * config.block_n * config.block_v * h / (hw.sm_flops * eta)
    epi = 0.0
    if epilogue is not None:
        logits = config.block_n * config.block_v
        issue = epilogue.instructions * logits / 32 / hw.issue_per_clock  # warp instructions
        clocks = max(issue, epilogue.mufu * logits / hw.mufu_per_clock)
        epi = clocks / hw.clock_hz * (1.0 if ctas == 1 else hw.epilogue_exposed_2cta)
    return ctas * (mma + epi) + hw.refill_s


def _sweep_seconds(
    plan: PassPlan, launch: KernelLaunch, config: TileConfig, ctas: int, epilogue: Epilogue, hw: Hopper
) -> float:
    """Forward statistics kernel: each program (row block, vocabulary split) sweeps ``split_len``
    columns, tile by tile."""
    rows, splits, group = _grid(plan, launch, config)
    steps = cdiv(min(plan.split_len or plan.v, plan.v), config.block_v)
    e = plan.dtype.itemsize
    h_block, w_tile = config.block_n * plan.h * e, config.block_v * plan.h * e
    total = 0.0
    for programs, wave_rows, wave_splits in _waves(rows, splits, group, hw.sm_count * ctas):
        resident = cdiv(programs, hw.sm_count)
        compute = steps * _tile_step_seconds(config, plan.h, resident, hw.eta_forward, epilogue, hw)
        # H blocks are re-read at every tile unless they stay in L2 next to the tiles of W in flight
        h_reads = 1 if wave_rows * h_block + wave_splits * w_tile <= hw.l2_bytes else steps
        traffic = wave_rows * h_block * h_reads + wave_splits * steps * w_tile
        total += max(compute, traffic / hw.hbm_bytes_per_s)
    return total


def _merge_seconds(plan: PassPlan, hw: Hopper) -> float:
    partial = plan.buffer("partial_stats")
    read = partial.nbytes if partial is not None else 0
    write = (partial.shape[0] if partial is not None else 4) * plan.n * 4
    return (read + write) / hw.hbm_bytes_per_s


def _grad_logits_seconds(
    plan: PassPlan, launch: KernelLaunch, config: TileConfig, ctas: int, epilogue: Epilogue, hw: Hopper
) -> float:
    """dZ kernel: one logits tile per program (the forward's main loop, so ``eta_forward``: its dot is
    the same pipelined tile loop), the gradient epilogue, the dZ tile stored."""
    rows, cols, group = _grid(plan, launch, config)
    e = plan.dtype.itemsize
    total = 0.0
    for programs, wave_rows, wave_cols in _waves(rows, cols, group, hw.sm_count * ctas):
        resident = cdiv(programs, hw.sm_count)
        compute = _tile_step_seconds(config, plan.h, resident, hw.eta_forward, epilogue, hw)
        reads = (wave_rows * config.block_n + wave_cols * config.block_v) * plan.h * e
        traffic = reads + programs * config.block_n * config.block_v * e  # + the dZ tiles written
        total += max(compute, traffic / hw.hbm_bytes_per_s)
    return total


def _fused_backward_seconds(
    plan: PassPlan, launch: KernelLaunch, config: TileConfig, ctas: int, hw: Hopper
) -> float:
    """The eafe6c5 backward: per tile three GEMMs at ``eta_backward`` and fp32 atomic adds of its dH rows
    and dW rows (vector width from the ``ATOMIC_VECTOR`` switch)."""
    rows, cols, group = _grid(plan, launch, config)
    waves = _waves(rows, cols, group, hw.sm_count * ctas)
    tile = 3 * 2 * config.block_n * config.block_v * plan.h / (hw.sm_flops * hw.eta_backward)
    compute = sum(cdiv(programs, hw.sm_count) * tile for programs, _, _ in waves)
    dh_fits = plan.n * plan.h * 4 <= hw.l2_bytes  # every vocabulary block adds into all of dH
    dw_fits = all(wave_cols * config.block_v * plan.h * 4 <= hw.l2_bytes for _, _, wave_cols in waves)
    adds_dh, adds_dw = rows * cols * config.block_n * plan.h, rows * cols * config.block_v * plan.h
    if launch.switches.get("ATOMIC_SEM", "acq_rel") == "acq_rel":
        threads = 32 * config.num_warps
        vector = int(launch.switches.get("ATOMIC_VECTOR", 4))

        def round_trip(fits: bool) -> float:
            return hw.fenced_round_trip_hit_s if fits else hw.fenced_round_trip_miss_s

        # each warp waits for each fenced atomic: a chain of round trips per tile
        chain = (config.block_n * round_trip(dh_fits) + config.block_v * round_trip(dw_fits)) * plan.h / (
            vector * threads
        )
        return compute + len(waves) * chain
    throughput = (adds_dh + adds_dw) / (hw.l2_slices * hw.l2_clock_hz * hw.relaxed_adds_per_slice_clock)
    hbm = 8 * ((0 if dh_fits else adds_dh) + (0 if dw_fits else adds_dw)) / hw.hbm_bytes_per_s
    return max(compute, throughput, hbm)


def _gemm_seconds(gemm: Gemm, hw: Hopper) -> float:
    return gemm.flops / hw.cublas_flops


def _extra_traffic_bytes(plan: PassPlan) -> int:
    """HBM bytes of the backward beyond its kernels' and GEMMs' own streaming of H, W and their outputs:
    the dZ chunks read by both GEMMs (the dZ kernel's write is counted with it), dW read-modify-write per
    token slab, the fp32 dH slab accumulation per chunk and its final cast, and zero-fill + cast of the
    fused backward's fp32 atomic buffers."""
    if plan.pass_name != "backward":
        return 0
    e = plan.dtype.itemsize
    total = sum(g.count * g.m * g.k * e for g in plan.gemms)  # dZ [rows, cols] is one operand of each
    if any(g.name == "grad_weight" for g in plan.gemms):
        slabs = cdiv(plan.n, plan.slab_rows)
        accumulator = plan.buffer("grad_weight_fp32")
        dw_e = 4 if accumulator is not None else e
        total += (2 * slabs - 1) * plan.v * plan.h * dw_e  # written by slab 1, read + written after
        if accumulator is not None:
            total += accumulator.nbytes + plan.v * plan.h * e  # final cast to the parameter dtype
    if plan.buffer("grad_hidden_slab") is not None:
        chunks = sum(g.count * g.m * g.n for g in plan.gemms if g.name == "grad_hidden")
        total += chunks * (e + 8) + plan.n * plan.h * (4 + e)  # chunk + fp32 slab read-add-write, cast
    for name in ("atomic_grad_hidden", "atomic_grad_weight"):
        buffer = plan.buffer(name)
        if buffer is not None:  # zero-fill, then read + cast to the parameter dtype
            total += 2 * buffer.nbytes + buffer.nbytes // 4 * e
    return total


def _elementwise_launches(plan: PassPlan) -> int:
    """Launches besides the plan's kernels and GEMMs: the dH slab adds per chunk and the final casts."""
    if plan.pass_name != "backward" or plan.buffer("grad_hidden_slab") is None:
        return 0
    return sum(g.count for g in plan.gemms if g.name == "grad_hidden") + cdiv(plan.n, plan.slab_rows)


# --- the paired training step (issue 18): a self-contained model of launch_plan.StepPlan -------------------

#: The H200 run's plan timing: the measured cuBLAS GEMM and the recompute route's measured ratios.
PLAN_TIMING = Path(__file__).parent / "results" / "h200-2026-11-26-plan_timing.json"
#: One loss evaluation per chunk (the pairs' coefficients: ~50 small kernels), and the handful of
#: launches around each chunk's GEMMs: HOPPER_REVIEW §3.2's 0.1 ms, an assumption.
STEP_CHUNK_OVERHEAD_S = 0.1e-3


@dataclass(frozen=True)
class MeasuredHead:
    """What the H200 measured for one head at one N (``PLAN_TIMING``): the cuBLAS head GEMM's FLOP/s and
    the recompute kernels' forward ÷ one GEMM and backward ÷ three GEMMs."""

    gemm_flops: float
    forward_ratio: float
    backward_ratio: float


def measured_head(head: str, n: int, vocab: int, hidden: int, path: Path = PLAN_TIMING) -> MeasuredHead:
    """The measured row of ``head`` (a ``[vocab, hidden]`` head) whose N is nearest ``n``, in log scale
    (ratios and GEMM rates move little between 1k and 16k tokens)."""
    rows = [r for r in json.loads(path.read_text())["rows"] if r["head"] == head]
    row = min(rows, key=lambda r: abs(math.log(r["n"] / max(n, 1))))
    rate = 2 * row["n"] * vocab * hidden / (row["gemm_ms"] * 1e-3)
    return MeasuredHead(rate, row["forward_ratio"], row["backward_ratio"])


@dataclass
class StepPrediction:
    """Predicted seconds of one training step of the head, the floor (three cuBLAS GEMMs over the kept
    rows at the measured rate), and the parts."""

    seconds: float
    floor_seconds: float
    parts: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.seconds / self.floor_seconds if self.floor_seconds else 1.0


def predict_step(plan: StepPlan, measured: MeasuredHead, hw: Hopper = H100) -> StepPrediction:
    """Predicted H100 time of a :class:`~wpo_kernels.kernels.launch_plan.StepPlan` (HOPPER_REVIEW §3.2):

    - one-pass chunks: three GEMMs over their rows at ``measured.gemm_flops``; the row-statistics read
      and the in-place gradient's read + write of the ``[rows, V]`` logits (3·rows·V elements) and the
      gathers / scatter of hidden and dH rows (4·rows·H) at ``hw.hbm_bytes_per_s``, not overlapped;
      half of a ``dW`` read + write per chunk after the first (the other half hidden under the GEMM);
      :data:`STEP_CHUNK_OVERHEAD_S` per chunk;
    - recompute chunks: per slab, the measured recompute ratios (forward ÷ one GEMM + backward ÷ three),
      plus the gathers and the dH scatter.
    """
    e, v, h = plan.dtype.itemsize, plan.v, plan.h
    gemm = lambda rows: 2 * rows * v * h / measured.gemm_flops  # noqa: E731
    parts = dict.fromkeys(("gemms", "logits_passes", "dw_rmw", "rows", "recompute", "overhead"), 0.0)
    one_pass = [c for c in plan.chunks if c.route == "one_pass" and c.rows]
    for chunk in one_pass:
        parts["gemms"] += 3 * gemm(chunk.rows)
        parts["logits_passes"] += 3 * chunk.rows * v * e / hw.hbm_bytes_per_s
    parts["dw_rmw"] = max(len(one_pass) - 1, 0) * v * h * e / hw.hbm_bytes_per_s
    for chunk in (c for c in plan.chunks if c.route == "recompute"):
        for start, stop in chunk.slabs():
            g = gemm(stop - start)
            parts["recompute"] += g * measured.forward_ratio + 3 * g * measured.backward_ratio
    parts["rows"] = 4 * plan.kept * h * e / hw.hbm_bytes_per_s
    parts["overhead"] = STEP_CHUNK_OVERHEAD_S * sum(1 for c in plan.chunks if c.rows)
    return StepPrediction(sum(parts.values()), 3 * gemm(plan.kept), parts)

"""Every configuration autotune (or a launch heuristic) may select for each Triton kernel, at one
representative specialisation per kernel and arch: the compile jobs of the resource test
(tests/test_triton_resources.py runs them through triton_sm90_compile.py --resources).

The configurations are read from the kernels' own autotuner objects (``configs`` and their early
prune, given the specialisation's arguments) and launch heuristics, never copied, so a config
added or pruned there is what this checks. Import with TRITON_INTERPRET unset: under the
interpreter the kernels carry one small config and no autotuner.
"""

import dataclasses
import types

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Heuristics
from triton_sm90_compile import ALIGNED, column_kernels, row_kernels

ARCHS = (90, 80)
# a representative large shape: B=4, H=16, L=4096, head dim 128; GEMM M=N=K=4096
BATCH, HEADS, LENGTH, HEAD_DIM, GEMM = 4, 16, 4096, 128, 4096


@dataclasses.dataclass
class Job:
    family: str
    fn: object  # the @triton.jit kernel
    types: dict  # argument name -> signature type; other arguments are i32
    constexprs: dict
    aligned: set
    num_warps: int
    num_stages: object  # None: triton's default
    arch: int
    config: dict  # the configuration's tile constexprs, for the report
    sixteen_bit: bool = True


def selectable(tuner, named_args, constexprs):
    """The configs ``tuner`` may pick for these arguments: its configs after its early prune."""
    if tuner.early_config_prune is None:
        return list(tuner.configs)
    return tuner.early_config_prune(tuner.configs, named_args, **constexprs)


def heuristic_values(tuner, args):
    """Constexprs the triton.heuristics wrapped inside ``tuner`` derive from ``args``."""
    values, fn = {}, tuner.fn
    while isinstance(fn, Heuristics):
        values.update({name: rule({**args, **values}) for name, rule in fn.values.items()})
        fn = fn.fn
    return values


def _tensor(sig_type):
    """A stand-in for a pointer argument in named_args: prunes may read its dtype."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "u8": torch.uint8,
             "i32": torch.int32, "i64": torch.int64}[sig_type.lstrip("*")]
    return torch.empty(0, dtype=dtype)


def _named_args(fn, types, ints):
    return {n: _tensor(types[n]) if types.get(n, "").startswith("*") else ints.get(n, 1) for n in fn.arg_names}


def _autotuned_jobs(family, tuner, fn, types, ints, constexprs, aligned, arch, describe=None):
    named = _named_args(fn, types, ints)
    jobs = []
    for config in selectable(tuner, named, constexprs):
        consts = {**constexprs, **config.kwargs}
        consts.update(heuristic_values(tuner, {**named, **consts}))
        job_types = describe(config) if describe else types
        jobs.append(Job(family, fn, job_types, consts, aligned, config.num_warps, config.num_stages, arch,
                        dict(config.kwargs)))
    return jobs


# --------------------------------------------------------------------------------------------
# attention: forward (also what decode's packed-GQA launches pick from), backward, combine
# --------------------------------------------------------------------------------------------

_ATTN_PTRS = {"Lse": "*fp32", "Delta": "*fp32", "Bias": "*bf16", "Slopes": "*fp32", "Seed": "*i64", "CuQ": "*i32",
              "CuK": "*i32",
              "LsePart": "*fp32", "OutPart": "*fp32",
              **{n: "*bf16" for n in ("Q", "K", "V", "Out", "dOut", "dQ", "dK", "dV", "dBias")}}
_ATTN_SCALARS = {"qk_scale": "fp32", "drop_scale": "fp32", "sm_scale": "fp32", "seed": "i64", "drop_threshold": "i64"}
_ATTN_ALIGNED = {f"s{t}_{d}" for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv") for d in "bhl"} | {"D", "Dv"} | {
    "so_s", "sdk_s", "sdv_s"}  # split and chunk strides: 0 or a tensor's size


def _unit_head_dim(fn):
    """The head-dim strides of ``fn``'s tensors: 1 for contiguous heads, a constexpr as Triton
    specialises it."""
    return {n: 1 for n in fn.arg_names if n.startswith("s") and n.endswith("_d")}


def _tma_types(types, rows, head_dim):
    """``describe`` for _autotuned_jobs: the arguments in ``rows`` (name -> the config's block
    constexpr) as the tensor descriptors the launcher passes on sm_90."""
    block_d = triton.next_power_of_2(head_dim)
    return lambda config: {**types, **{n: f"tensordesc<bf16[1, 1, {config.kwargs[r]}, {block_d}]>"
                                       for n, r in rows.items()}}


def attention_jobs(arch, dropout_p=0.0, head_dims=(HEAD_DIM,)):
    """Forward, backward and decode-combine jobs at each head dim (bf16 causal); on sm_90 the
    forward's K/V and dK/dV's Q/dO are TMA descriptors, as the launchers pass aligned inputs."""
    from fusedformer.kernels import attention as A
    from fusedformer.kernels import attention_backward as AB
    from fusedformer.kernels import attention_common as C

    tma = arch >= 90
    pow2 = triton.next_power_of_2
    types = {**_ATTN_PTRS, **_ATTN_SCALARS, "Seed": "*i64"}
    jobs = []
    for head_dim in head_dims:
        ints = dict(B=BATCH, H=HEADS, G=1, Lq=LENGTH, Lk=LENGTH, D=head_dim, Dv=head_dim, key_lq=pow2(LENGTH),
                    key_lk=pow2(LENGTH))
        # bf16 causal self-attention: the common training / prefill launch
        # VEC: 16 bytes of bf16, as the launchers find every stride and head dim a multiple of 8 here
        flags = dict(C.flags(None, True, (-1, -1), None, dropout_p), VARLEN=False, IEEE_DOT=False, VEC=8,
                     BLOCK_D=C.block_d(head_dim), BLOCK_DV=C.block_d(head_dim))
        fwd_tuner, _ = A._tuned_fwd()
        fwd_tma = tma and not dropout_p  # the launcher keeps pointers for dropout (see forward_launches)
        fwd = dict(flags, PACK_GQA=False, USE_TMA=fwd_tma, **_unit_head_dim(A._attn_fwd_kernel))
        kv = {n: C.TMA_ROWS[n] for n in ("K", "V")}
        jobs += _autotuned_jobs("attention_fwd", fwd_tuner, A._attn_fwd_kernel, types, ints, fwd, _ATTN_ALIGNED, arch,
                                _tma_types(types, kv, head_dim) if fwd_tma else None)
        tuner, _ = AB._tuned("dkdv")
        qdo = {n: C.TMA_ROWS[n] for n in ("Q", "dOut")}
        jobs += _autotuned_jobs("attention_bwd", tuner, AB._attn_bwd_dkdv, types, ints,
                                dict(flags, USE_TMA=tma, **_unit_head_dim(AB._attn_bwd_dkdv)), _ATTN_ALIGNED, arch,
                                _tma_types(types, qdo, head_dim) if tma else None)
        tuner, _ = AB._tuned("dq")
        jobs += _autotuned_jobs("attention_bwd", tuner, AB._attn_bwd_dq, types, ints,
                                dict(flags, **_unit_head_dim(AB._attn_bwd_dq)), _ATTN_ALIGNED, arch)
        for job in jobs:  # the head dim in the row's config (and label)
            job.config.setdefault("BLOCK_D", C.block_d(head_dim))
    # decode's split-K merge: one program per row, the launcher's fixed split block
    blocks = dict(BLOCK_S=A.COMBINE_BLOCK_S, BLOCK_DV=C.block_d(HEAD_DIM))
    jobs.append(Job("attention_decode", A._attn_combine_kernel, types, blocks, {"Dv"}, 4, None, arch, blocks))
    return jobs


# --------------------------------------------------------------------------------------------
# GEMM with the bias + activation epilogue (TMA persistent on sm_90), and the epilogue kernels
# --------------------------------------------------------------------------------------------

_GEMM_ALIGNED = {"stride_xm", "stride_wn", "stride_dym", "stride_hs", "stride_hm", "K", "N_OUT", "M_BUCKET"}


# (MODE, activation, rows): the forward, its gated form, the gated recompute backward (the most
# epilogue stores: dgate, dup, y and the dy load), and decode's split-K partials
GEMM_VARIANTS = ((0, "gelu", GEMM), (0, "swiglu", GEMM), (1, "swiglu", GEMM), (2, "gelu", 16))


def gemm_jobs(arch, plant=False):
    from fusedformer.kernels import bias_act as BA
    from fusedformer.kernels import matmul_act as MA

    tuner = MA._tuned_kernel
    if plant:  # 4 stages of 64x256 bf16 x and w tiles: 256 KB of shared memory
        big = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 8}, num_warps=4, num_stages=4,
                            pre_hook=tuner.configs[0].pre_hook)
        tuner = types.SimpleNamespace(configs=[big], early_config_prune=None, fn=tuner.fn)
    jobs = []
    for mode, activation, rows in GEMM_VARIANTS[:1] if plant else GEMM_VARIANTS:
        jobs += _gemm_variant_jobs(MA, tuner, arch, mode, BA.kernel_activation("resource test", activation), rows)
    if plant:
        return jobs
    # swiglu: of every activation, the most registers in both bias_act kernels (245-248 in the backward)
    act, gated = BA.kernel_activation("resource test", "swiglu")
    block_m, block_n = BA._blocks(GEMM)
    common = dict(ACT=act, GATED=gated, CD=tl.float32, BLOCK_M=block_m, BLOCK_N=block_n)
    epilogue = {n: "*bf16" for n in ("H", "B", "Y", "P", "DY", "DH")} | {"DB": "*fp32"}
    row_blocks = 8  # the most row blocks per backward program (_row_blocks)
    # the forward as launched on a matmul output: triton specialises its unit column stride (the
    # backward assumes one)
    jobs.append(Job("bias_act", BA._bias_act_fwd_kernel, epilogue,
                    dict(common, HAS_BIAS=True, STORE_PREACT=True, stride_hn=1), _GEMM_ALIGNED, 4, None, arch,
                    {"BLOCK_M": block_m, "BLOCK_N": block_n}))
    backward = dict(common, ADD_BIAS=True, BIAS_GRAD=True, STORE_Y=True, ROW_BLOCKS=row_blocks)
    jobs.append(Job("bias_act", BA._bias_act_bwd_kernel, epilogue, backward, _GEMM_ALIGNED, 4, None, arch,
                    {"BLOCK_M": block_m, "BLOCK_N": block_n, "ROW_BLOCKS": row_blocks}))
    return jobs


def _gemm_variant_jobs(MA, tuner, arch, mode, act_gated, rows):
    """The selectable configs of one GEMM variant, specialised as the launcher would for aligned
    bf16 operands of rows x 4096 x 4096: on sm_90 TMA loads, and TMA epilogue except MODE 2."""
    act, gated = act_gated
    tma = arch >= 90  # the launcher takes TMA on sm_90+ for aligned 16-bit operands
    ints = dict(M=rows, N_OUT=GEMM, K=GEMM, M_BUCKET=triton.next_power_of_2(rows), SPLITS=4 if mode == 2 else 1)
    constexprs = dict(MODE=mode, ACT=act, GATED=gated, HAS_BIAS=mode != 2, STORE_Y=mode == 1, STORE_P=mode == 0,
                      USE_TMA=tma, OUT_TMA=tma and mode != 2, INPUT_PRECISION=MA._input_precision(torch.bfloat16),
                      stride_xk=1, stride_wk=1)
    sig = {n: "*bf16" for n in ("X", "W", "B", "Y", "P", "DY")} | {"DB": "*fp32"}
    if mode == 2:
        sig = dict(sig, P="*fp32")

    def describe(config):
        if not tma:
            return sig
        # the config's pre_hook sets the descriptors' block shapes: ask it rather than copy its rule
        descs = ("X", "W") + (("Y", "P", "DY") if constexprs["OUT_TMA"] else ())
        nargs = {**config.kwargs, **constexprs, **{n: _Descriptor() for n in descs}}
        config.pre_hook(nargs)
        return {**sig, **{n: f"tensordesc<bf16{list(nargs[n].block_shape)}>" for n in descs
                          if nargs[n].block_shape is not None}}

    return _autotuned_jobs("matmul_act", tuner, MA._matmul_act_kernel, sig, ints, constexprs, _GEMM_ALIGNED, arch,
                           describe)


class _Descriptor:
    """What a config's pre_hook sees of a TensorDescriptor: the block shape it sets."""

    block_shape = None


# --------------------------------------------------------------------------------------------
# softmax and norms: launch heuristics instead of autotuning
# --------------------------------------------------------------------------------------------


def _largest(choices):
    """The choice with the largest tile among (BLOCK_M, BLOCK_N, ...) tuples."""
    return max(choices, key=lambda c: c[0] * c[1])


def row_jobs(arch):
    from fusedformer.kernels import _rows
    from fusedformer.kernels import softmax as ks

    lengths = [1 << k for k in range(4, 18)]  # row lengths 16 .. 128k: every tile shape the rules produce
    jobs = []
    for backward in (False, True):
        picks = {_rows.row_config(4096, n, 2, backward) for n in lengths}
        for single in (True, False):  # the largest one-pass tile, and the looped walk
            bm, bn, one_pass, warps = _largest([p for p in picks if p[2] == single])
            jobs += _heuristic_jobs("rows", row_kernels(dict(BLOCK_M=bm, BLOCK_N=bn, SINGLE=one_pass), warps,
                                                        backward), arch)
    picks = {ks._columns_config(128, n) for n in lengths}
    for single in (True, False):
        bb, bn, one_pass, warps = _largest([p for p in picks if p[2] == single])
        jobs += _heuristic_jobs("rows", column_kernels(dict(BLOCK_N=bn, BLOCK_B=bb, SINGLE=one_pass), warps), arch)
    return jobs


def _heuristic_jobs(family, kernels, arch):
    jobs = []
    for _, fn, ptrs, floats, constexprs, warps in kernels:
        types_ = {**{n: "*" + t for n, t in ptrs.items()}, **{n: "fp32" for n in floats}}
        config = {k: v for k, v in constexprs.items() if k.isupper() and k.startswith(("BLOCK", "SINGLE"))}
        jobs.append(Job(family, fn, types_, constexprs, ALIGNED, warps, None, arch, config))
    return jobs


def jobs(plant=False):
    """Every compile job, biggest first (so the shards finish together)."""
    if plant:
        return [job for arch in ARCHS for job in gemm_jobs(arch, plant=True)]
    return [job for arch in ARCHS for job in attention_jobs(arch, head_dims=(HEAD_DIM, 64)) + gemm_jobs(arch)
            + row_jobs(arch)]

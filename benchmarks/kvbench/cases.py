"""Benchmark cases (what to run) and workloads (the tensors of one case on one device).

A :class:`Case` is a plain, hashable description (op, layout, dtype, sizes). A :class:`Workload`
builds its tensors on a device, computes the reference result ONCE (the reference backend, on the
same device), and checks any implementation's result against it:

* writes: the WHOLE cache buffers (every byte, so a write to a wrong place shows), bit-exact for
  bf16/fp16 caches, within one fp8 rounding step for fp8 caches;
* attention: the output (poisoned with NaN before each checked call) against the float32
  reference by ``|out - ref| / |ref|`` (Frobenius norms), with a NaN anywhere failing.

Byte and FLOP counts are the least an implementation must move / compute (see ``Workload``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .compare import attention_mismatch, base, bases, caches_mismatch, clone_views, force_backend
from .layouts import block_slots, device_fill, fp8_max, make_kv_cache, make_mla_cache, random_block_table, random_slots

__all__ = ["OPS", "Case", "Workload", "default_suite", "quick_suite", "select_cases",
           "ATTENTION_OPS", "WRITE_OPS", "DTYPES", "FP8_CASE_DTYPES", "CASE_DTYPES"]

WRITE_OPS = ("write", "mla-write")
ATTENTION_OPS = ("decode", "prefill", "mixed")
OPS = WRITE_OPS + ATTENTION_OPS
PUBLIC_OP = {"write": "reshape_and_cache_flash", "mla-write": "concat_and_cache_mla",
             "decode": "flash_attn_varlen_func", "prefill": "flash_attn_varlen_func",
             "mixed": "flash_attn_varlen_func"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# case dtypes with an fp8 cache and bf16 activations ("fp8q": q quantized to the cache's fp8 type too)
FP8_CASE_DTYPES = ("fp8", "fp8q")
CASE_DTYPES = tuple(DTYPES) + FP8_CASE_DTYPES


@dataclass(frozen=True)
class Case:
    """One benchmark configuration.

    ``dtype`` is the activation dtype ("bf16", "fp16"); "fp8" means bf16 activations with an fp8
    e4m3 cache (writes quantize with per-tensor scales, attention dequantizes with descales).
    "fp8q" (attention only) is "fp8" with q itself quantized to the cache's fp8 type with a
    per-tensor ``q_descale``, as vLLM calls FA3 with an fp8 cache; the output stays bf16. It
    measures the fp8 x fp8 path of a kernel, which "fp8" (bf16 q) does not reach. A write case
    given "fp8q" is an "fp8" write (writes have no q).
    Writes use ``tokens``; attention uses ``batch`` sequences of ``kv_len`` keys with ``q_len``
    queries each; "mixed" makes the first ``prefills`` sequences chunked prefills of ``q_len``
    queries and the rest decodes (one query). ``slots`` (writes): "random" (every token in a random
    slot of its own), or "prefill" (random blocks filled by consecutive tokens, as a prefill writes).
    """

    op: str
    layout: str = "NHD"
    dtype: str = "bf16"
    tokens: int = 0
    batch: int = 0
    q_len: int = 1
    kv_len: int = 0
    prefills: int = 0
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_size: int = 128
    head_size_v: Optional[int] = None
    block_size: int = 16
    causal: bool = True
    kv_lora_rank: int = 512
    rope_dim: int = 64
    slots: str = "random"

    @property
    def act_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype in FP8_CASE_DTYPES else DTYPES[self.dtype]

    @property
    def kv_cache_dtype(self) -> str:
        return "fp8" if self.dtype in FP8_CASE_DTYPES else "auto"

    def cache_dtype(self, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.dtype:
        return fp8_dtype if self.dtype in FP8_CASE_DTYPES else self.act_dtype

    @property
    def fp8_q(self) -> bool:
        """q is quantized to the cache's fp8 type (attention cases of dtype "fp8q")."""
        return self.dtype == "fp8q" and self.op in ATTENTION_OPS

    @property
    def size(self) -> str:
        """Short size label, e.g. ``T4096`` or ``B32xL4096`` (also what ``--sizes`` filters on)."""
        if self.op in WRITE_OPS:
            return f"T{self.tokens}"
        if self.op == "mixed":
            return f"B{self.batch}xL{self.kv_len}+{self.prefills}x{self.q_len}q"
        if self.op == "prefill":
            return f"B{self.batch}xL{self.kv_len}"
        return f"B{self.batch}xL{self.kv_len}"

    @property
    def shape(self) -> str:
        if self.op == "write":
            dv = f"/{self.head_size_v}" if self.head_size_v else ""
            slots = "" if self.slots == "random" else f" {self.slots} slots"
            return f"H{self.num_kv_heads}xD{self.head_size}{dv} bs{self.block_size}{slots}"
        if self.op == "mla-write":
            return f"{self.kv_lora_rank}+{self.rope_dim} bs{self.block_size}"
        dv = f"/{self.head_size_v}" if self.head_size_v else ""
        return f"{self.num_q_heads}q/{self.num_kv_heads}kv xD{self.head_size}{dv} bs{self.block_size}" + \
            (" causal" if self.causal and self.op != "decode" else "")

    @property
    def id(self) -> str:
        return f"{self.op} {self.layout} {self.dtype} {self.size} {self.shape}"

    def q_lens(self) -> list:
        if self.op == "decode":
            return [1] * self.batch
        if self.op == "prefill":
            return [self.q_len] * self.batch
        return [self.q_len] * self.prefills + [1] * (self.batch - self.prefills)


# -- suites ------------------------------------------------------------------------------------------
def default_suite() -> list:
    """The standard GPU suite, anchored on the issue's H100 configs (bf16, 8 kv heads x 128,
    block 16: writes of 256 / 4096 / 32768 tokens; decode 32q/8kv, batch 32 and 128 x 4096 keys;
    prefill 8 x 2048 causal), plus layouts, fp8 (the prefill also with an fp8 q), MLA and a
    chunked-prefill mix."""
    w = Case("write", num_kv_heads=8, head_size=128, block_size=16)
    cases = [replace(w, tokens=t) for t in (256, 4096, 32768)]
    for layout in ("HND", "combined", "combined-HND", "cross-layer", "head-major"):
        cases += [replace(w, layout=layout, tokens=t) for t in (4096, 32768)]
    # a prefill's slots (consecutive tokens per block): what the head-major tile path is for
    cases += [replace(w, layout=layout, tokens=32768, slots="prefill") for layout in ("NHD", "head-major")]
    cases.append(replace(w, layout="head-major", tokens=4096, slots="prefill"))
    cases.append(replace(w, layout="diffkv", head_size=128, head_size_v=64, tokens=32768))
    cases += [replace(w, dtype="fp16", tokens=32768), replace(w, dtype="fp8", tokens=4096),
              replace(w, dtype="fp8", tokens=32768), replace(w, dtype="fp8", layout="HND", tokens=32768)]
    m = Case("mla-write", layout="MLA", block_size=64)
    cases += [replace(m, tokens=t) for t in (256, 4096, 32768)]
    cases.append(replace(m, tokens=32768, dtype="fp8"))
    d = Case("decode", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, kv_len=4096)
    cases += [replace(d, batch=32), replace(d, batch=128)]
    for layout in ("HND", "combined", "cross-layer"):
        cases.append(replace(d, layout=layout, batch=32))
    cases += [replace(d, dtype="fp16", batch=32), replace(d, dtype="fp8", batch=32),
              replace(d, batch=32, block_size=64), replace(d, batch=8, kv_len=32768)]
    cases.append(Case("decode", layout="mla-slices", num_q_heads=16, num_kv_heads=1, head_size=576,
                      head_size_v=512, block_size=64, batch=32, kv_len=4096))
    p = Case("prefill", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16, batch=8,
             q_len=2048, kv_len=2048)
    cases += [p, replace(p, layout="HND"), replace(p, dtype="fp8"), replace(p, dtype="fp8q")]
    cases.append(Case("mixed", num_q_heads=32, num_kv_heads=8, head_size=128, block_size=16,
                      batch=64, prefills=4, q_len=512, kv_len=4096))
    return cases


def quick_suite() -> list:
    """Tiny sizes for CPU smoke runs and tests (seconds with the reference backend)."""
    w = Case("write", num_kv_heads=2, head_size=64, block_size=16, tokens=64)
    d = Case("decode", num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, batch=3, kv_len=80)
    p = Case("prefill", num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, batch=2, q_len=48, kv_len=48)
    return [
        w, replace(w, layout="HND"), replace(w, dtype="fp8"), replace(w, tokens=256),
        Case("mla-write", layout="MLA", kv_lora_rank=64, rope_dim=16, block_size=16, tokens=48),
        d, replace(d, layout="HND"), replace(d, dtype="fp8"),
        p, replace(p, dtype="fp8q"),
        Case("mixed", num_q_heads=4, num_kv_heads=2, head_size=64, block_size=16, batch=4, prefills=1,
             q_len=16, kv_len=64),
    ]


def _split(s: Optional[str]) -> Optional[list]:
    return None if not s else [x.strip() for x in s.split(",") if x.strip()]


def _pairs(s: str) -> list:
    out = []
    for item in _split(s) or ():
        b, _, l = item.lower().partition("x")
        out.append((int(b), int(l)))
    return out


def select_cases(cases: list, ops=None, layouts=None, dtypes=None, sizes=None, tokens=None,
                 decode=None, prefill=None) -> list:
    """Filter a suite (comma strings as on the command line) and apply size overrides.

    ``tokens`` ("256,4096") replaces the sizes of write cases; ``decode`` / ``prefill``
    ("32x4096,128x4096" = batch x kv length) replace those of decode / prefill cases.
    ``sizes`` keeps cases whose size label (``Case.size``) is listed.
    """
    ops, layouts, dtypes, sizes = _split(ops), _split(layouts), _split(dtypes), _split(sizes)
    if ops:
        bad = [o for o in ops if o not in OPS]
        if bad:
            raise ValueError(f"--ops: unknown {bad}; expected some of {list(OPS)}")
    if dtypes:
        bad = [d for d in dtypes if d not in CASE_DTYPES]
        if bad:
            raise ValueError(f"--dtypes: unknown {bad}; expected some of {list(CASE_DTYPES)}")
    out = []
    seen = set()

    def add(c):
        if c not in seen:
            seen.add(c)
            out.append(c)

    for c in cases:
        if ops and c.op not in ops:
            continue
        if layouts and c.layout not in layouts:
            continue
        if dtypes and c.dtype not in dtypes:
            continue
        if c.op in WRITE_OPS and tokens:
            for t in (int(x) for x in _split(tokens)):
                add(replace(c, tokens=t))
            continue
        if c.op == "decode" and decode:
            for b, l in _pairs(decode):
                add(replace(c, batch=b, kv_len=l))
            continue
        if c.op == "prefill" and prefill:
            for b, l in _pairs(prefill):
                add(replace(c, batch=b, q_len=l, kv_len=l))
            continue
        if sizes and c.size not in sizes:
            continue
        add(c)
    return out


# -- workloads -----------------------------------------------------------------------------------
@dataclass
class Workload:
    """The tensors of one :class:`Case` on one device, its reference result and its costs.

    Attributes used by implementations (adapters read only what they need):
      writes: ``key`` [T, H, Dk], ``value`` [T, H, Dv], ``key_cache`` / ``value_cache`` (views in
      ``case.layout``), ``slot_mapping`` int64 [T], ``k_scale`` / ``v_scale`` (fp8: float32 [1]);
      MLA: ``kv_c`` [T, R], ``k_pe`` [T, P], ``kv_cache`` [blocks, bs, R + P], ``scale``;
      attention: ``q`` [total_q, Hq, Dk], ``key_cache`` / ``value_cache`` (4-D views),
      ``cu_seqlens_q`` int32 [B+1], ``seqused_k`` int32 [B], ``block_table`` int32 [B, max_blocks],
      ``max_seqlen_q`` / ``max_seqlen_k``, ``k_descale`` / ``v_descale`` (fp8: float32 [B, Hkv]),
      ``q_descale`` (fp8q: float32 [1], q is then fp8; None otherwise: check it before reading q),
      ``softmax_scale``, ``causal``, ``q_lens`` / ``kv_lens`` (python lists).
    """

    case: Case
    device: torch.device
    fp8_dtype: torch.dtype = torch.float8_e4m3fn
    t: dict = field(default_factory=dict)
    ref: object = None
    bytes: int = 0
    flops: int = 0

    def __getattr__(self, name):
        try:
            return self.__dict__["t"][name]
        except KeyError:
            raise AttributeError(name) from None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, case: Case, device, fp8_dtype: torch.dtype = torch.float8_e4m3fn, seed: int = 0) -> "Workload":
        device = torch.device(device)
        torch.manual_seed(seed)
        w = cls(case, device, fp8_dtype)
        if case.op == "write":
            w._build_write()
        elif case.op == "mla-write":
            w._build_mla()
        else:
            w._build_attention()
        return w

    def _build_write(self):
        c, dev = self.case, self.device
        t, h, dk = c.tokens, c.num_kv_heads, c.head_size
        dv = c.head_size_v or dk
        nb = max(2 * -(-t // c.block_size) + 8, 64)
        kc, vc = make_kv_cache(c.layout, nb, c.block_size, h, dk, c.head_size_v, dtype=c.cache_dtype(self.fp8_dtype),
                               device=dev, fill=False)
        for b in bases(kc, vc):
            device_fill(b)
        act = c.act_dtype
        self.t.update(key=torch.randn(t, h, dk, device=dev, dtype=act), value=torch.randn(t, h, dv, device=dev, dtype=act),
                      key_cache=kc, value_cache=vc,
                      slot_mapping=(block_slots if c.slots == "prefill" else random_slots)(
                          t, nb, c.block_size, dtype=torch.int64).to(dev),
                      k_scale=None, v_scale=None, kv_cache_dtype=c.kv_cache_dtype)
        if c.kv_cache_dtype == "fp8":
            self.t.update(k_scale=torch.tensor([0.02], device=dev), v_scale=torch.tensor([0.03], device=dev))
        in_b, cache_b = torch.empty((), dtype=act).element_size(), kc.element_size()
        self.bytes = t * h * (dk + dv) * (in_b + cache_b) + t * 8
        self._snapshot(kc, vc)
        from kvdispatch import reshape_and_cache_flash
        ref_k, ref_v = clone_views(kc, vc)
        with force_backend("reference"):
            reshape_and_cache_flash(self.key, self.value, ref_k, ref_v, self.slot_mapping, c.kv_cache_dtype,
                                    self.k_scale, self.v_scale)
        self.ref = [ref_k, ref_v]

    def _build_mla(self):
        c, dev = self.case, self.device
        t, r, p = c.tokens, c.kv_lora_rank, c.rope_dim
        nb = max(2 * -(-t // c.block_size) + 8, 16)
        cache = make_mla_cache(nb, c.block_size, r, p, dtype=c.cache_dtype(self.fp8_dtype), device=dev, fill=False)
        device_fill(base(cache))
        act = c.act_dtype
        self.t.update(kv_c=torch.randn(t, r, device=dev, dtype=act), k_pe=torch.randn(t, p, device=dev, dtype=act),
                      kv_cache=cache, slot_mapping=random_slots(t, nb, c.block_size, dtype=torch.int64).to(dev),
                      scale=torch.tensor([0.02], device=dev) if c.kv_cache_dtype == "fp8" else None,
                      kv_cache_dtype=c.kv_cache_dtype)
        in_b, cache_b = torch.empty((), dtype=act).element_size(), cache.element_size()
        self.bytes = t * (r + p) * (in_b + cache_b) + t * 8
        self._snapshot(cache)
        from kvdispatch import concat_and_cache_mla
        (ref_cache,) = clone_views(cache)
        with force_backend("reference"):
            concat_and_cache_mla(self.kv_c, self.k_pe, ref_cache, self.slot_mapping, c.kv_cache_dtype, self.scale)
        self.ref = [ref_cache]

    def _build_attention(self):
        c, dev = self.case, self.device
        q_lens = c.q_lens()
        kv_lens = [c.kv_len] * c.batch
        if c.op == "prefill":
            kv_lens = [max(c.kv_len, c.q_len)] * c.batch
        hq, hk, dk = c.num_q_heads, c.num_kv_heads, c.head_size
        dv = c.head_size_v or dk
        need = sum(-(-l // c.block_size) for l in kv_lens)
        nb = need + max(8, need // 8)
        kc, vc = make_kv_cache(c.layout, nb, c.block_size, hk, dk, c.head_size_v, dtype=c.cache_dtype(self.fp8_dtype),
                               device=dev, fill=False)
        for b in bases(kc, vc):
            device_fill(b)
        act = c.act_dtype
        total_q = sum(q_lens)
        cu_q = [0]
        for l in q_lens:
            cu_q.append(cu_q[-1] + l)
        q, q_descale = torch.randn(total_q, hq, dk, device=dev, dtype=act), None
        if c.fp8_q:
            # vLLM's per-tensor quantization of q for FA3 with an fp8 cache: q ~= q_fp8 * q_descale
            fmax = fp8_max(kc.dtype)
            q_descale = (q.float().abs().amax() / fmax).clamp_min(1e-12).reshape(1)
            q = (q.float() / q_descale).clamp(-fmax, fmax).to(kc.dtype)
        self.t.update(
            q=q, q_descale=q_descale, key_cache=kc, value_cache=vc,
            cu_seqlens_q=torch.tensor(cu_q, dtype=torch.int32, device=dev),
            seqused_k=torch.tensor(kv_lens, dtype=torch.int32, device=dev),
            block_table=random_block_table(kv_lens, nb, c.block_size).to(dev),
            max_seqlen_q=max(q_lens), max_seqlen_k=max(kv_lens), q_lens=q_lens, kv_lens=kv_lens,
            softmax_scale=1.0 / math.sqrt(dk), causal=c.causal, k_descale=None, v_descale=None,
            head_size_v=dv)
        if c.kv_cache_dtype == "fp8":
            self.t.update(k_descale=torch.rand(c.batch, hk, device=dev) * 0.02 + 0.01,
                          v_descale=torch.rand(c.batch, hk, device=dev) * 0.02 + 0.01)
        cache_b = kc.element_size()
        kv_dims = dk if c.layout == "mla-slices" else dk + dv  # V is a slice of K there: read once
        act_b, q_b = torch.empty((), dtype=act).element_size(), q.element_size()
        self.bytes = sum(kv_lens) * hk * kv_dims * cache_b + total_q * hq * (dk * q_b + dv * act_b)
        pairs = 0
        for lq, lk in zip(q_lens, kv_lens):
            if c.causal:  # bottom-right aligned: query i sees keys <= i + lk - lq
                pairs += sum(min(lk, max(0, i + lk - lq + 1)) for i in range(lq))
            else:
                pairs += lq * lk
        self.flops = 2 * pairs * hq * (dk + dv)
        from kvdispatch import flash_attn_varlen_func
        with force_backend("reference"):
            self.ref = flash_attn_varlen_func(**self.public_attention_kwargs()).float()

    # -- helpers for implementations ---------------------------------------------------------------
    def public_attention_kwargs(self, out: Optional[torch.Tensor] = None) -> dict:
        """Keyword arguments of ``kvdispatch.flash_attn_varlen_func`` for this workload."""
        return dict(q=self.q, k=self.key_cache, v=self.value_cache, max_seqlen_q=self.max_seqlen_q,
                    cu_seqlens_q=self.cu_seqlens_q, max_seqlen_k=self.max_seqlen_k, seqused_k=self.seqused_k,
                    softmax_scale=self.softmax_scale, causal=self.causal, block_table=self.block_table,
                    out=out, q_descale=self.q_descale, k_descale=self.k_descale, v_descale=self.v_descale)

    def new_out(self) -> torch.Tensor:
        """A NaN-filled output in the activation dtype (bf16 also for an fp8 q)."""
        return torch.full((self.q.shape[0], self.q.shape[1], self.head_size_v), float("nan"),
                          dtype=self.case.act_dtype, device=self.device)

    def gathered_kv(self, dtype: Optional[torch.dtype] = None):
        """Per sequence, contiguous K/V ``[Hkv, kv_len, D]`` gathered from the paged cache (fp8:
        dequantized to ``dtype``, by default the activation dtype): what a "no paging" baseline gets for free."""
        ks, vs = [], []
        bs = self.case.block_size
        dtype = dtype or self.case.act_dtype
        for b, lk in enumerate(self.kv_lens):
            blocks = self.block_table[b, :-(-lk // bs)].long()
            k = self.key_cache[blocks].flatten(0, 1)[:lk]  # [lk, Hkv, D]
            v = self.value_cache[blocks].flatten(0, 1)[:lk]
            k, v = k.to(torch.float32), v.to(torch.float32)
            if self.k_descale is not None:
                k = k * self.k_descale[b].view(1, -1, 1)
                v = v * self.v_descale[b].view(1, -1, 1)
            ks.append(k.to(dtype).transpose(0, 1).contiguous())
            vs.append(v.to(dtype).transpose(0, 1).contiguous())
        return ks, vs

    def _snapshot(self, *caches):
        """Remember the caches' buffers and their initial contents (``reset`` restores them)."""
        self._caches = caches
        self._bases = bases(*caches)
        self._initial = [b.clone() for b in self._bases]

    def reset(self) -> None:
        """Restore the caches' initial contents (before checking an implementation)."""
        for b, init in zip(self._bases, self._initial):
            b.copy_(init)

    def check(self, result) -> Optional[str]:
        """None when ``result`` matches the reference, else what is wrong.

        Writes: ``result`` is ignored; the workload's own cache buffers are compared whole.
        Attention: ``result`` is the output ``[total_q, Hq, Dv]``.
        """
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.case.op in WRITE_OPS:
            return caches_mismatch(self._caches, self.ref, self.case.kv_cache_dtype == "fp8", self.fp8_dtype)
        if not isinstance(result, torch.Tensor):
            return f"returned {type(result).__name__}, expected the output tensor"
        tol = 3e-2 if self.case.dtype in ("bf16",) + FP8_CASE_DTYPES else 1e-2 if self.case.dtype == "fp16" else 1e-4
        why, rel = attention_mismatch(result, self.ref, tol)
        if why:
            return why
        self.last_error = rel
        return None

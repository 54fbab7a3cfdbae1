"""Bad input: a ValueError/TypeError naming the argument, raised before anything is written."""

import pytest
import torch

import kvdispatch as kvd
from kvbench.layouts import make_kv_cache, make_mla_cache, random_block_table, random_slots

from matrix import force_backend

H, D, BS, NB, T = 2, 64, 16, 4, 6


def _write_args(**over):
    k, v = make_kv_cache("NHD", NB, BS, H, D)
    a = dict(key=torch.randn(T, H, D).bfloat16(), value=torch.randn(T, H, D).bfloat16(), key_cache=k,
             value_cache=v, slot_mapping=random_slots(T, NB, BS), kv_cache_dtype="auto", k_scale=None,
             v_scale=None)
    a.update(over)
    return a


def _fp8_caches():
    return make_kv_cache("NHD", NB, BS, H, D, dtype=torch.uint8)


BAD_WRITES = {
    "key heads": (dict(key=torch.randn(T, H + 1, D).bfloat16()), ValueError, "key"),
    "key head size": (dict(key=torch.randn(T, H, D // 2).bfloat16()), ValueError, "key"),
    "value head size": (dict(value=torch.randn(T, H, D + 8).bfloat16()), ValueError, "value"),
    "value tokens": (dict(value=torch.randn(T - 1, H, D).bfloat16()), ValueError, "value"),
    "key dtype": (dict(key=torch.randn(T, H, D), value=torch.randn(T, H, D)), TypeError, "key"),
    "value dtype": (dict(value=torch.randn(T, H, D).half()), TypeError, "value"),
    "kv_cache_dtype": (dict(kv_cache_dtype="int8"), ValueError, "kv_cache_dtype"),
    "key stride(-1)": (dict(key=torch.randn(T, H, 2 * D).bfloat16()[..., ::2]), ValueError, "key"),
    "slot dtype": (dict(slot_mapping=torch.arange(T, dtype=torch.int16)), TypeError, "slot_mapping"),
    "slot float": (dict(slot_mapping=torch.arange(T).float()), TypeError, "slot_mapping"),
    "slot shape": (dict(slot_mapping=torch.arange(T).reshape(2, -1)), ValueError, "slot_mapping"),
    "slot too long": (dict(slot_mapping=torch.arange(T + 1)), ValueError, "slot_mapping"),
    "slot out of range": (dict(slot_mapping=torch.tensor([0, 1, 2, 3, 4, NB * BS])), ValueError, "slot_mapping"),
    "key not a tensor": (dict(key=[1, 2]), TypeError, "key"),
    "mixed devices": (dict(key=torch.randn(T, H, D, device="meta").bfloat16()), ValueError, "key"),
}


def _bad_fp8(kind):
    k, v = _fp8_caches()
    base = dict(key_cache=k, value_cache=v, kv_cache_dtype="fp8")
    return {
        "no scale": dict(base),
        "int scale": dict(base, k_scale=torch.ones(1, dtype=torch.int32), v_scale=torch.ones(1)),
        "float64 scale": dict(base, k_scale=torch.ones(1), v_scale=torch.ones(1, dtype=torch.float64)),
        "scale shape": dict(base, k_scale=torch.ones(3), v_scale=torch.ones(1)),
        "auto on uint8": dict(base, kv_cache_dtype="auto"),
        "e5m2 on e4m3 cache": dict(base, key_cache=k.view(torch.float8_e4m3fn), value_cache=v.view(torch.float8_e4m3fn),
                                   kv_cache_dtype="fp8_e5m2", k_scale=torch.ones(1), v_scale=torch.ones(1)),
    }[kind]


def _snapshot(*ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("case", sorted(BAD_WRITES))
def test_bad_write_raises_before_writing(case):
    over, exc, name = BAD_WRITES[case]
    a = _write_args(**over)
    before = _snapshot(a["key_cache"], a["value_cache"])
    with force_backend("reference"), pytest.raises(exc) as e:
        kvd.reshape_and_cache_flash(**a)
    assert str(e.value).startswith(name) or f"{name}:" in str(e.value), str(e.value)
    assert "got" in str(e.value) or "out of range" in str(e.value)  # says what it found
    assert torch.equal(a["key_cache"], before[0]) and torch.equal(a["value_cache"], before[1])


@pytest.mark.parametrize("kind", ["no scale", "int scale", "float64 scale", "scale shape", "auto on uint8",
                                  "e5m2 on e4m3 cache"])
def test_bad_fp8_write(kind):
    a = _write_args(**_bad_fp8(kind))
    before = _snapshot(a["key_cache"], a["value_cache"])
    with pytest.raises((ValueError, TypeError)) as e:
        kvd.reshape_and_cache_flash(**a)
    msg = str(e.value)
    assert msg.split(":")[0] in ("k_scale", "v_scale", "kv_cache_dtype", "key_cache"), msg
    assert torch.equal(a["key_cache"].view(torch.uint8), before[0].view(torch.uint8))


def test_bad_cache_shapes():
    k, v = make_kv_cache("NHD", NB, BS, H, D)
    key = torch.randn(T, H, D).bfloat16()
    slots = random_slots(T, NB, BS)
    with pytest.raises(ValueError, match="^value_cache: expected the key_cache's num_blocks"):
        kvd.reshape_and_cache_flash(key, key, k, v[:, :, :1], slots)
    with pytest.raises(TypeError, match="^value_cache: expected the key_cache's dtype"):
        kvd.reshape_and_cache_flash(key, key, k, v.half(), slots)
    with pytest.raises(ValueError, match="^key_cache: the last dimension must be contiguous"):
        kvd.reshape_and_cache_flash(key, key, k.transpose(2, 3), v, slots)
    with pytest.raises(ValueError, match="^key_cache: expected 4-D"):
        kvd.reshape_and_cache_flash(key, key, k[0], v, slots)


def test_bad_mla_write():
    cache = make_mla_cache(NB, BS, 64, 16)
    before = cache.clone()
    kv_c, k_pe, slots = torch.randn(T, 64).bfloat16(), torch.randn(T, 16).bfloat16(), random_slots(T, NB, BS)
    for args, name in [((kv_c[:, :60], k_pe, cache, slots), "kv_c/k_pe"),
                       ((kv_c, k_pe[:3], cache, slots), "k_pe"),
                       ((kv_c.float(), k_pe.float(), cache, slots), "kv_c"),
                       ((kv_c, k_pe, cache[..., None], slots), "kv_cache"),
                       ((kv_c, k_pe, cache, slots.int().float()), "slot_mapping")]:
        with pytest.raises((ValueError, TypeError)) as e:
            kvd.concat_and_cache_mla(*args)
        assert str(e.value).startswith(name), str(e.value)
    with pytest.raises(ValueError, match="^scale: an fp8"):
        kvd.concat_and_cache_mla(kv_c, k_pe, cache.view(torch.uint8)[..., :80] if False else
                                 make_mla_cache(NB, BS, 64, 16, dtype=torch.uint8), slots, "fp8")
    assert torch.equal(cache, before)


def _attn_args(**over):
    k, v = make_kv_cache("NHD", 8, BS, H, D)
    lens = [5, 20]
    a = dict(q=torch.randn(2, 4, D).bfloat16(), k=k, v=v, max_seqlen_q=1,
             cu_seqlens_q=torch.tensor([0, 1, 2], dtype=torch.int32), max_seqlen_k=20,
             seqused_k=torch.tensor(lens, dtype=torch.int32), block_table=random_block_table(lens, 8, BS),
             out=torch.full((2, 4, D), float("nan")).bfloat16())
    a.update(over)
    return a


BAD_ATTN = {
    "q heads": (dict(q=torch.randn(2, 3, D).bfloat16(), out=torch.empty(2, 3, D).bfloat16()), "q"),
    "q head size": (dict(q=torch.randn(2, 4, 32).bfloat16()), "q"),
    "q dtype": (dict(q=torch.randn(2, 4, D).half()), "q"),
    "q 2-D": (dict(q=torch.randn(2, 4 * D).bfloat16()), "q"),
    "out shape": (dict(out=torch.empty(2, 4, D + 1).bfloat16()), "out"),
    "cu_seqlens_q dtype": (dict(cu_seqlens_q=torch.tensor([0, 1, 2])), "cu_seqlens_q"),
    "block_table dtype": (dict(block_table=torch.zeros(2, 2, dtype=torch.int64)), "block_table"),
    "block_table batch": (dict(block_table=torch.zeros(3, 2, dtype=torch.int32)), "block_table"),
    "block id out of range": (dict(block_table=torch.full((2, 2), 8, dtype=torch.int32)), "block_table"),
    "seqused_k missing": (dict(seqused_k=None), "seqused_k"),
    "seqused_k too long": (dict(seqused_k=torch.tensor([5, 40], dtype=torch.int32)), "seqused_k"),
    "seqused_k dtype": (dict(seqused_k=torch.tensor([5, 20])), "seqused_k"),
    "k_descale shape": (dict(k_descale=torch.ones(3)), "k_descale"),
    "window": (dict(window_size=(-2, 0)), "window_size"),
    "window arity": (dict(window_size=(1,)), "window_size"),
    "softcap": (dict(softcap=-1.0), "softcap"),
    "max_seqlen_q": (dict(max_seqlen_q=-1), "max_seqlen_q"),
    "no cu_seqlens_k unpaged": (dict(block_table=None, seqused_k=None, k=torch.randn(9, H, D).bfloat16(),
                                     v=torch.randn(9, H, D).bfloat16()), "cu_seqlens_k"),
    "mixed devices": (dict(out=torch.empty(2, 4, D, device="meta").bfloat16()), "out"),
    "head-major cache": (dict(k=make_kv_cache("head-major", 8, BS, H, D)[0],
                              v=make_kv_cache("head-major", 8, BS, H, D)[1]), "k"),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTN))
def test_bad_attention_raises_before_writing(case):
    over, name = BAD_ATTN[case]
    a = _attn_args(**over)
    out = a["out"]
    before = out.clone() if out is not None and out.device.type == "cpu" else None
    with force_backend("reference"), pytest.raises((ValueError, TypeError)) as e:
        kvd.flash_attn_varlen_func(**a)
    assert str(e.value).startswith(name), str(e.value)
    if before is not None and before.shape == out.shape:
        assert torch.equal(out.isnan(), before.isnan())


def test_bad_attention_after_a_good_call_with_the_same_shapes():
    """The public call remembers signatures whose tensor checks passed; a later call that differs
    in any checked property, or passes bad scalars with a remembered signature, still fails."""
    a = _attn_args()
    with force_backend("reference"):
        kvd.flash_attn_varlen_func(**a)  # remembered
        for over, name in [(dict(softcap=-1.0), "softcap"), (dict(max_seqlen_k=-3), "max_seqlen_k"),
                           (dict(window_size=(-5, 0)), "window_size"),
                           (dict(seqused_k=a["seqused_k"].long()), "seqused_k"),
                           (dict(block_table=a["block_table"].long()), "block_table"),
                           (dict(cu_seqlens_q=[0, 1, 2]), "cu_seqlens_q"),
                           (dict(q=a["q"].half()), "q"),
                           (dict(out=torch.empty(2, 4, 2 * D).bfloat16()[..., ::2]), "out")]:
            b = dict(a, **over)
            before = b["out"].clone()
            with pytest.raises((ValueError, TypeError)) as e:
                kvd.flash_attn_varlen_func(**b)
            assert str(e.value).startswith(name), str(e.value)
            assert torch.equal(b["out"].view(torch.int16), before.view(torch.int16))  # bit-identical

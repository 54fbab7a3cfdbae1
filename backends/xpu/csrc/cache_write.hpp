// reshape_and_cache_flash: scatter one token's key and value rows into a paged cache of any layout.
//
// One work-group per token; its work-items stride over the token's (head, dim) elements, so
// consecutive work-items touch consecutive dims of a head (contiguous in every supported layout
// except the head-major value cache, where dims are `s_chunk` apart). Every cache address comes
// from the descriptor's formula with the cache's real strides, passed at run time: a permuted,
// sliced or cross-layer view is addressed exactly like a packed one, so nothing can land in the
// wrong place. Padding slots (< 0) are skipped by the whole work-group, and so is a slot past the
// cache (>= num_blocks * block_size: only possible when the value checks are off): the kernel never
// writes outside the cache whatever slot_mapping holds.
//
// Template parameters:
//   In / Cache  element policies (kvx_types.hpp): Raw<uintN_t> for both when the cache stores the
//               input as is (bit copy); otherwise In = Plain<float|half|bfloat16>, Cache = Fp8<kind>
//   Quant       true: store Cache::from_float(x / scale) (saturating fp8)
//   Slot        int32_t or int64_t (slot_mapping's dtype)
//   Idx         int64_t, or int32_t when the host proved every offset fits
#pragma once
#include "kvx_types.hpp"

// The kernel's parameter list, shared by every entry point (run-time compiled free functions and
// the AOT extension's lambdas) so the argument order is written down once.
#define KVX_CACHE_WRITE_PARAMS(InS, CacheS, SlotT)                                                  \
  const InS *key, const InS *value, CacheS *key_cache, CacheS *value_cache,                        \
      const SlotT *slot_mapping, const float *k_scale, const float *v_scale, int64_t key_s_token,  \
      int64_t key_s_head, int64_t value_s_token, int64_t value_s_head, int64_t num_heads,          \
      int64_t head_size_k, int64_t head_size_v, int64_t block_size, int64_t num_blocks,            \
      int64_t k_s_block, int64_t k_s_token, int64_t k_s_head, int64_t k_s_chunk, int64_t k_x,      \
      int64_t v_s_block, int64_t v_s_token, int64_t v_s_head, int64_t v_s_chunk, int64_t v_x,      \
      int64_t k_scale_step, int64_t v_scale_step
#define KVX_CACHE_WRITE_ARGS                                                                       \
  key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale, key_s_token, key_s_head,     \
      value_s_token, value_s_head, num_heads, head_size_k, head_size_v, block_size, num_blocks,    \
      k_s_block, k_s_token, k_s_head, k_s_chunk, k_x, v_s_block, v_s_token, v_s_head, v_s_chunk,   \
      v_x, k_scale_step, v_scale_step

namespace kvx {

template <class In, class Cache, bool Quant, class Idx>
inline void write_rows(size_t lid, size_t wg, const typename In::storage *src, Idx s_token,
                       Idx s_head, Idx token, typename Cache::storage *cache, Idx block, Idx offset,
                       Idx heads, Idx head_size, Idx s_block, Idx s_tok, Idx s_head_c, Idx s_chunk,
                       Idx x, const float *scale, Idx scale_step) {
  const Idx n = heads * head_size;
  const Idx base = block * s_block + offset * s_tok;
  for (Idx i = Idx(lid); i < n; i += Idx(wg)) {
    const Idx h = i / head_size, d = i % head_size;
    const auto v = src[token * s_token + h * s_head + d];
    const Idx dst = base + h * s_head_c + (d / x) * s_chunk + d % x;
    if constexpr (Quant) {
      // a division, not a multiply by 1/scale: the reference divides and fp8 rounding shows it
      cache[dst] = Cache::from_float(In::to_float(v) / scale[h * scale_step]);
    } else {
      cache[dst] = v;
    }
  }
}

template <class In, class Cache, bool Quant, class SlotT, class Idx>
inline void cache_write(sycl::nd_item<1> it,
                        KVX_CACHE_WRITE_PARAMS(typename In::storage, typename Cache::storage, SlotT)) {
  const Idx token = Idx(it.get_group(0));
  const int64_t slot = int64_t(slot_mapping[token]);
  // padding token, or a slot past the cache (dropped like padding): uniform across the work-group
  if (slot < 0 || slot >= num_blocks * block_size) return;
  const Idx block = Idx(slot / block_size), offset = Idx(slot % block_size);
  const size_t lid = it.get_local_id(0), wg = it.get_local_range(0);
  write_rows<In, Cache, Quant, Idx>(lid, wg, key, Idx(key_s_token), Idx(key_s_head), token,
                                    key_cache, block, offset, Idx(num_heads), Idx(head_size_k),
                                    Idx(k_s_block), Idx(k_s_token), Idx(k_s_head), Idx(k_s_chunk),
                                    Idx(k_x), k_scale, Idx(k_scale_step));
  write_rows<In, Cache, Quant, Idx>(lid, wg, value, Idx(value_s_token), Idx(value_s_head), token,
                                    value_cache, block, offset, Idx(num_heads), Idx(head_size_v),
                                    Idx(v_s_block), Idx(v_s_token), Idx(v_s_head), Idx(v_s_chunk),
                                    Idx(v_x), v_scale, Idx(v_scale_step));
}

}  // namespace kvx

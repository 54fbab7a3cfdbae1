// concat_and_cache_mla: store [kv_c | k_pe] of one token as one row of the MLA latent cache
// [blocks, block_size, kv_lora_rank + rope_dim] (any block/token strides, last dim contiguous).
//
// One work-group per token, work-items over the row's elements. Same element policies and index
// narrowing as cache_write.hpp; one scale (the latent cache has one "head"). Slots < 0 (padding)
// and >= num_blocks * block_size (past the cache) write nothing.
#pragma once
#include "kvx_types.hpp"

#define KVX_MLA_WRITE_PARAMS(InS, CacheS, SlotT)                                                    \
  const InS *kv_c, const InS *k_pe, CacheS *kv_cache, const SlotT *slot_mapping,                   \
      const float *scale, int64_t kv_c_s_token, int64_t k_pe_s_token, int64_t kv_lora_rank,        \
      int64_t rope_dim, int64_t block_size, int64_t num_blocks, int64_t c_s_block,                \
      int64_t c_s_token
#define KVX_MLA_WRITE_ARGS                                                                         \
  kv_c, k_pe, kv_cache, slot_mapping, scale, kv_c_s_token, k_pe_s_token, kv_lora_rank, rope_dim,   \
      block_size, num_blocks, c_s_block, c_s_token

namespace kvx {

template <class In, class Cache, bool Quant, class SlotT, class Idx>
inline void concat_and_cache_mla(sycl::nd_item<1> it,
                                 KVX_MLA_WRITE_PARAMS(typename In::storage, typename Cache::storage,
                                                      SlotT)) {
  const Idx token = Idx(it.get_group(0));
  const int64_t slot = int64_t(slot_mapping[token]);
  if (slot < 0 || slot >= num_blocks * block_size) return;  // padding, or past the cache: dropped
  const Idx base = Idx(slot / block_size) * Idx(c_s_block) + Idx(slot % block_size) * Idx(c_s_token);
  const Idx rank = Idx(kv_lora_rank), n = rank + Idx(rope_dim);
  float s = 1.0f;
  if constexpr (Quant) s = scale[0];
  for (Idx i = Idx(it.get_local_id(0)); i < n; i += Idx(it.get_local_range(0))) {
    const auto v = i < rank ? kv_c[token * Idx(kv_c_s_token) + i]
                            : k_pe[token * Idx(k_pe_s_token) + (i - rank)];
    if constexpr (Quant) {
      kv_cache[base + i] = Cache::from_float(In::to_float(v) / s);
    } else {
      kv_cache[base + i] = v;
    }
  }
}

}  // namespace kvx

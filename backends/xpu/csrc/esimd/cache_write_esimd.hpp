// ESIMD twin of cache_write.hpp for Intel GPUs: the element-copy write (cache dtype == input
// dtype, the common bf16/fp16 case) with whole head rows moved as SIMD block loads/stores.
//
// One work-item (= one hardware thread in ESIMD) per (token, head): it block-loads the head's
// key row and value row (DK / DV elements, in 64-byte pieces: one LSC block message each) and
// block-stores them at the slot. Dims of a head are contiguous in every 4-D layout (NHD, HND,
// combined, cross-layer, diffkv), which is what the block messages need; the head-major cache
// (value dims a block_size apart) stays with the plain-SYCL twin. The host picks this variant only
// for 4-D caches whose row starts are all 16-byte aligned (kernels.py: esimd_eligible), never on
// the CPU lane (ESIMD has no CPU target), and only with KVDISPATCH_XPU_ESIMD=1 until it is
// measured on an Intel GPU against its twin. Addressing is the same descriptor formula.
#pragma once
#include <sycl/ext/intel/esimd.hpp>

#include "../kvx_types.hpp"

#define KVX_CACHE_WRITE_ESIMD_PARAMS(T, SlotT)                                                      \
  const T *key, const T *value, T *key_cache, T *value_cache, const SlotT *slot_mapping,           \
      int64_t key_s_token, int64_t key_s_head, int64_t value_s_token, int64_t value_s_head,        \
      int64_t num_heads, int64_t block_size, int64_t num_blocks, int64_t k_s_block,               \
      int64_t k_s_token, int64_t k_s_head, int64_t v_s_block, int64_t v_s_token, int64_t v_s_head
#define KVX_CACHE_WRITE_ESIMD_ARGS                                                                 \
  key, value, key_cache, value_cache, slot_mapping, key_s_token, key_s_head, value_s_token,        \
      value_s_head, num_heads, block_size, num_blocks, k_s_block, k_s_token, k_s_head, v_s_block,  \
      v_s_token, v_s_head

namespace kvx {
namespace esimd = sycl::ext::intel::esimd;

// Copies a contiguous row of D elements (a multiple of 16 bytes, 16-byte aligned at both ends):
// 64-byte block messages, then 16-byte ones for the remainder.
template <class T, int D>
inline void copy_row(const T *src, T *dst) SYCL_ESIMD_FUNCTION {
  constexpr int PIECE = 64 / int(sizeof(T)), UNIT = 16 / int(sizeof(T));
  static_assert(D % UNIT == 0, "rows are copied in 16-byte units");
  constexpr int FULL = D - D % PIECE;
  constexpr auto aligned = esimd::properties{esimd::alignment<16>};
#pragma unroll
  for (int i = 0; i < FULL; i += PIECE) {
    esimd::simd<T, PIECE> v = esimd::block_load<T, PIECE>(src + i, aligned);
    esimd::block_store<T, PIECE>(dst + i, v, aligned);
  }
#pragma unroll
  for (int i = FULL; i < D; i += UNIT) {
    esimd::simd<T, UNIT> v = esimd::block_load<T, UNIT>(src + i, aligned);
    esimd::block_store<T, UNIT>(dst + i, v, aligned);
  }
}

template <class T, int DK, int DV, class SlotT, class Idx>
inline void cache_write_esimd(sycl::nd_item<1> it,
                              KVX_CACHE_WRITE_ESIMD_PARAMS(T, SlotT)) SYCL_ESIMD_FUNCTION {
  const Idx gid = Idx(it.get_global_id(0));
  const Idx token = gid / Idx(num_heads), h = gid % Idx(num_heads);
  const int64_t slot = int64_t(slot_mapping[token]);
  if (slot < 0 || slot >= num_blocks * block_size) return;  // padding, or past the cache: dropped
  const Idx block = Idx(slot / block_size), offset = Idx(slot % block_size);
  copy_row<T, DK>(key + token * Idx(key_s_token) + h * Idx(key_s_head),
                  key_cache + block * Idx(k_s_block) + offset * Idx(k_s_token) + h * Idx(k_s_head));
  copy_row<T, DV>(value + token * Idx(value_s_token) + h * Idx(value_s_head),
                  value_cache + block * Idx(v_s_block) + offset * Idx(v_s_token) + h * Idx(v_s_head));
}

}  // namespace kvx

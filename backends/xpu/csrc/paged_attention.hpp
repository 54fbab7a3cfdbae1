// flash_attn_varlen_func over a paged (or one-block, non-paged) KV cache of any 4-D layout:
// decode, prefill and chunked-prefill batches in one kernel.
//
// One work-group per (query token, kv head, GT of the query heads sharing that kv head): GQA/MQA
// heads read each K and V element once per group instead of once per query head (decode is
// bound by reading the cache; MLA decode has 16-128 query heads on one kv head). The group walks
// the query's visible key range [lo, hi) in tiles of WG keys: each work-item scores one key of the
// tile for the GT heads (q rows staged in local memory), the group takes each head's tile max and
// sum (online softmax, float32), then each work-item updates its own output dims of the GT heads
// over the tile's keys (dims are contiguous across work-items, so V rows are read coalesced). Masking is bottom-right aligned like
// flash-attn: query i of a sequence with Lq queries and Lk keys sits at key position
// p = i + Lk - Lq and sees keys j with p - left <= j <= p + right (-1: unbounded; causal is
// right = 0). A query that sees no key writes zeros (the reference's convention).
//
// Engine extras, all run-time arguments (a null pointer turns each off; no extra instantiations):
//   alibi_slopes  float32 [num_q_heads] (seq step 0) or [batch, num_q_heads], any strides: the
//                 score of key j gets -slope * |p - j| after softcap, before masking (flash-attn)
//   s_aux         [num_q_heads] attention-sink logits (float32, half or bf16: sink_dtype 0/1/2),
//                 one more term exp(s_aux) in the row's softmax denominator with no value; folded
//                 in once after the key loop (online softmax: the sink is one more "tile")
//   softmax_lse   float32 [num_q_heads, total_q], any strides: log of each row's denominator
//                 (sink included), -inf for a row that sees no key and has no sink
// Bounds: whatever the index tensors hold (the value checks may be off), every read and write
// stays inside the tensors: seqused_k is clamped to the block table's capacity, block ids to
// [0, num_blocks), non-paged key ranges to k's rows, the sequence index to [0, batch), and rows of
// q / out / softmax_lse are the launch's own (one group per row of q). Out-of-range values give a
// defined but meaningless result for their sequence only; KVDISPATCH_DEBUG=1 reports them instead.
// The kernel never splits the key range (one work-group walks all of a row's keys), so every
// num_splits the caller asks for (0 auto, 1 none, n at most n) is honoured as "no split".
//
// Template parameters:
//   QE, KVE, OutE  element policies (kvx_types.hpp) of q, the cache (Plain or Fp8) and out
//   DK, DV         head sizes of K and V (compile-time, so q / accumulator live in local memory
//                  of exactly that size; DV may be < DK: MLA with V a slice of K's buffer)
//   GT             query heads per work-group (a group of G heads takes ceil(G / GT) work-groups)
//   WG             work-group size = keys per tile
//   Idx            offset type (int64_t unless the host proved int32 suffices)
#pragma once
#include "kvx_types.hpp"

#define KVX_ATTENTION_PARAMS(QS, KVS, OutS)                                                         \
  const QS *q, const KVS *k_cache, const KVS *v_cache, OutS *out, const int32_t *cu_seqlens_q,     \
      const int32_t *cu_seqlens_k, const int32_t *seqused_k, const int32_t *block_table,           \
      const float *q_descale, const float *k_descale, const float *v_descale, int64_t q_s_token,   \
      int64_t q_s_head, int64_t o_s_token, int64_t o_s_head, int64_t k_s_block, int64_t k_s_token, \
      int64_t k_s_head, int64_t k_s_chunk, int64_t k_x, int64_t v_s_block, int64_t v_s_token,      \
      int64_t v_s_head, int64_t v_s_chunk, int64_t v_x, int64_t bt_s_seq, int64_t block_size,      \
      int64_t num_blocks, int64_t max_blocks_per_seq, int32_t batch, int32_t num_q_heads,         \
      int32_t group, int32_t paged, float softmax_scale, float softcap, int32_t window_left,       \
      int32_t window_right, int64_t q_ds_seq, int64_t q_ds_head,                                   \
      int64_t k_ds_seq, int64_t k_ds_head, int64_t v_ds_seq, int64_t v_ds_head,                    \
      const float *alibi_slopes, const void *s_aux, float *softmax_lse, int64_t al_s_seq,          \
      int64_t al_s_head, int64_t sink_s_head, int32_t sink_dtype, int64_t lse_s_head,              \
      int64_t lse_s_token
#define KVX_ATTENTION_ARGS                                                                         \
  q, k_cache, v_cache, out, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table, q_descale,         \
      k_descale, v_descale, q_s_token, q_s_head, o_s_token, o_s_head, k_s_block, k_s_token,         \
      k_s_head, k_s_chunk, k_x, v_s_block, v_s_token, v_s_head, v_s_chunk, v_x, bt_s_seq,           \
      block_size, num_blocks, max_blocks_per_seq, batch, num_q_heads, group, paged, softmax_scale, \
      softcap, window_left, window_right, q_ds_seq, q_ds_head, k_ds_seq, k_ds_head, v_ds_seq,     \
      v_ds_head, alibi_slopes,                                                                     \
      s_aux, softmax_lse, al_s_seq, al_s_head, sink_s_head, sink_dtype, lse_s_head, lse_s_token

namespace kvx {

// One sink logit of s_aux as float: sink_dtype 0 float32, 1 half, 2 bfloat16 (the model's dtype
// is read as it is: no conversion kernel per call on the host).
inline float load_sink(const void *s_aux, int32_t sink_dtype, int64_t i) {
  if (sink_dtype == 1) return float(static_cast<const sycl::half *>(s_aux)[i]);
  if (sink_dtype == 2) return float(static_cast<const sycl::ext::oneapi::bfloat16 *>(s_aux)[i]);
  return static_cast<const float *>(s_aux)[i];
}

template <class QE, class KVE, class OutE, int DK, int DV, int GT, int WG, class Idx>
inline void paged_attention(sycl::nd_item<1> it, KVX_ATTENTION_PARAMS(typename QE::storage,
                                                                      typename KVE::storage,
                                                                      typename OutE::storage)) {
  auto wg = it.get_group();
  const int lid = int(it.get_local_id(0));
  const int num_kv_heads = num_q_heads / group;
  const int head_tiles = (group + GT - 1) / GT;
  const int64_t per_token = int64_t(num_kv_heads) * head_tiles;
  const int64_t t = int64_t(it.get_group(0)) / per_token;
  const int rest = int(int64_t(it.get_group(0)) % per_token);
  const int kvh = rest / head_tiles;
  const int h0 = kvh * group + (rest % head_tiles) * GT;         // first query head of this group
  const int gn = sycl::min(GT, kvh * group + group - h0);       // query heads it serves (<= GT)
  // the host may launch one group per row of q (no sync to read cu_seqlens_q[batch]): rows past
  // the last sequence belong to nobody and are left as they are
  // (t < total_q always: the launch has exactly one group per row of q and kv-head tile, so q,
  // out and softmax_lse are only touched at rows that exist, whatever cu_seqlens_q holds)
  if (batch <= 0 || t >= cu_seqlens_q[batch]) return;

  // the sequence of query token t: the last b with cu_seqlens_q[b] <= t (empty sequences skipped).
  // b stays in [0, batch - 1] whatever cu_seqlens_q holds (a bisection of that range), so every
  // per-sequence read below (cu_seqlens_*[b + 1], seqused_k, block_table row, descales, slopes)
  // is in bounds
  int lo_b = 0, hi_b = batch - 1;
  while (lo_b < hi_b) {
    const int mid = (lo_b + hi_b + 1) / 2;
    if (cu_seqlens_q[mid] <= t) lo_b = mid; else hi_b = mid - 1;
  }
  const int b = lo_b;
  const int64_t lq = cu_seqlens_q[b + 1] - cu_seqlens_q[b];
  const int64_t i = t - cu_seqlens_q[b];
  // In-kernel bounds (the value checks may be off, e.g. xpu-sycl without KVDISPATCH_DEBUG=1): the
  // key range of a sequence never leaves what exists. Paged: lk in [0, max_blocks_per_seq *
  // block_size] (its block_table row), block ids clamped to [0, num_blocks - 1] below. Non-paged:
  // the "cache" is one block of block_size = total_k rows, [k_start, k_start + lk) within it.
  int64_t lk, k_start = 0;
  if (paged) {
    const int64_t capacity = num_blocks > 0 ? max_blocks_per_seq * block_size : 0;
    lk = sycl::clamp(int64_t(seqused_k[b]), int64_t(0), capacity);
  } else {
    k_start = sycl::clamp(int64_t(cu_seqlens_k[b]), int64_t(0), block_size);
    lk = sycl::clamp(int64_t(cu_seqlens_k[b + 1]) - k_start, int64_t(0), block_size - k_start);
    if (seqused_k) lk = sycl::clamp(int64_t(seqused_k[b]), int64_t(0), lk);
  }
  const int64_t p = i + lk - lq;
  const int64_t lo = window_left >= 0 ? sycl::max(int64_t(0), p - window_left) : 0;
  const int64_t hi = window_right >= 0 ? sycl::min(lk, p + window_right + 1) : lk;

  // descales: one element (steps 0) or [batch, kv_heads]
  const float qd = q_descale ? q_descale[b * q_ds_seq + kvh * q_ds_head] : 1.0f;
  // k_descale multiplies every key element: fold it into the score scale
  const float score_scale =
      softmax_scale * (k_descale ? k_descale[b * k_ds_seq + kvh * k_ds_head] : 1.0f);
  const float vd = v_descale ? v_descale[b * v_ds_seq + kvh * v_ds_head] : 1.0f;

  // work-group local memory of compile-time size (work_group_static: the run-time compiler
  // crashes on group_local_memory_for_overwrite, DPC++ 2026.2)
  static sycl::ext::oneapi::experimental::work_group_static<float[GT][DK]> q_loc;
  static sycl::ext::oneapi::experimental::work_group_static<float[GT][DV]> acc;
  static sycl::ext::oneapi::experimental::work_group_static<float[GT][WG]> prob;
  static sycl::ext::oneapi::experimental::work_group_static<Idx[WG]> v_row;

  // heads past gn get q = 0: their scores are computed (branch-free) and never used
  for (int e = lid; e < GT * DK; e += WG) {
    const int g = e / DK, d = e % DK;
    q_loc[g][d] = g < gn ? QE::to_float(q[t * q_s_token + (h0 + g) * q_s_head + d]) * qd : 0.0f;
  }
  for (int e = lid; e < GT * DV; e += WG) acc[e / DV][e % DV] = 0.0f;
  sycl::group_barrier(wg);

  float m[GT], l[GT], slope[GT];
#pragma unroll
  for (int g = 0; g < GT; g++) {
    m[g] = -kInf;
    l[g] = 0.0f;
    slope[g] = alibi_slopes && g < gn ? alibi_slopes[b * al_s_seq + (h0 + g) * al_s_head] : 0.0f;
  }
  for (int64_t j0 = lo; j0 < hi; j0 += WG) {
    const int64_t j = j0 + lid;
    float s[GT];
#pragma unroll
    for (int g = 0; g < GT; g++) s[g] = -kInf;
    if (j < hi) {
      Idx blk, tok;
      if (paged) {
        // 0 <= j < lk <= max_blocks_per_seq * block_size: the column exists; the id is clamped
        blk = Idx(sycl::clamp(int64_t(block_table[b * bt_s_seq + j / block_size]), int64_t(0),
                              num_blocks - 1));
        tok = Idx(j % block_size);
      } else {
        blk = 0;
        tok = Idx(k_start + j);
      }
      const Idx kb = blk * Idx(k_s_block) + tok * Idx(k_s_token) + Idx(kvh) * Idx(k_s_head);
      float dot[GT] = {};
      for (int d = 0; d < DK; d++) {
        const float kv = KVE::to_float(k_cache[kb + Idx(d / k_x) * Idx(k_s_chunk) + Idx(d % k_x)]);
#pragma unroll
        for (int g = 0; g < GT; g++) dot[g] += q_loc[g][d] * kv;
      }
#pragma unroll
      for (int g = 0; g < GT; g++) {
        s[g] = dot[g] * score_scale;
        if (softcap > 0.0f) s[g] = softcap * sycl::tanh(s[g] / softcap);
      }
      if (alibi_slopes) {  // uniform across the work-group
        const float dist = float(p >= j ? p - j : j - p);
#pragma unroll
        for (int g = 0; g < GT; g++) s[g] -= slope[g] * dist;
      }
      v_row[lid] = blk * Idx(v_s_block) + tok * Idx(v_s_token) + Idx(kvh) * Idx(v_s_head);
    }
    float alpha[GT];
#pragma unroll
    for (int g = 0; g < GT; g++) {
      if (g < gn) {  // uniform across the work-group
        const float m_new = sycl::max(m[g], sycl::reduce_over_group(wg, s[g], sycl::maximum<float>()));
        const float pj = j < hi ? sycl::exp(s[g] - m_new) : 0.0f;
        alpha[g] = sycl::exp(m[g] - m_new);  // 0 on the first tile (m = -inf)
        l[g] = l[g] * alpha[g] + sycl::reduce_over_group(wg, pj, sycl::plus<float>());
        m[g] = m_new;
        prob[g][lid] = pj;
      } else {
        alpha[g] = 0.0f;
        prob[g][lid] = 0.0f;
      }
    }
    sycl::group_barrier(wg);
    const int n = int(sycl::min(int64_t(WG), hi - j0));
    for (int d = lid; d < DV; d += WG) {
      const Idx dv = Idx(d / v_x) * Idx(v_s_chunk) + Idx(d % v_x);
      float a[GT];
#pragma unroll
      for (int g = 0; g < GT; g++) a[g] = acc[g][d] * alpha[g];
      for (int jj = 0; jj < n; jj++) {
        const float vv = KVE::to_float(v_cache[v_row[jj] + dv]);  // read once for GT heads
#pragma unroll
        for (int g = 0; g < GT; g++) a[g] += prob[g][jj] * vv;
      }
#pragma unroll
      for (int g = 0; g < GT; g++) acc[g][d] = a[g];
    }
    sycl::group_barrier(wg);  // prob / v_row are rewritten by the next tile
  }
  // the sink joins each head's denominator as one more logit with no value; then the row's LSE
  float norm[GT];
#pragma unroll
  for (int g = 0; g < GT; g++) {
    float mm = m[g], ll = l[g], rescale = 1.0f;
    if (s_aux && g < gn) {
      const float sk = load_sink(s_aux, sink_dtype, (h0 + g) * sink_s_head);
      const float mx = sycl::fmax(mm, sk);
      if (mx > -kInf) {                 // else no key was seen and the sink is -inf: nothing
        rescale = sycl::exp(mm - mx);   // 0 when no key was seen (lse = s_aux, out = 0)
        ll = ll * rescale + sycl::exp(sk - mx);
        mm = mx;
      }
    }
    // l = 0: the row saw nothing (zeros, lse -inf); a NaN l stays NaN in out and lse
    norm[g] = ll <= 0.0f ? 0.0f : vd * rescale / ll;
    if (softmax_lse && lid == 0 && g < gn)
      softmax_lse[(h0 + g) * lse_s_head + t * lse_s_token] = ll <= 0.0f ? -kInf : mm + sycl::log(ll);
  }
  for (int e = lid; e < gn * DV; e += WG) {
    const int g = e / DV, d = e % DV;
    out[t * o_s_token + (h0 + g) * o_s_head + d] = OutE::from_float(acc[g][d] * norm[g]);
  }
}

}  // namespace kvx

//! Block top-k sparse attention (after MoBA, Lu et al. 2025, and Quest,
//! Tang et al. 2024): keys come in blocks of `block` positions; each block
//! of queries scores every key block by the largest, over its queries, of
//! Quest's upper bound on a query's dot product with the block's keys, and
//! attends, exactly, to the keys of its `keep` best blocks only.
//!
//! (The first version scored by summed queries · mean key. On associative
//! recall at 2,048 tokens it kept 38 % of the answers against dense
//! attention's 94 %: filler queries outvote the one query of a block that
//! needs a distant key, and a mean over 64 keys hides the one that
//! matches. The bound keeps 93 %; `docs/benchmarks.md`.)
//!
//! Token-level top-k ([`crate::fusion::attention::keep_top_k`]) still
//! computes every score and only masks, so it costs more than dense
//! attention. Here the work per query is `S / block` block scores plus
//! `keep × block` keys: at 2,048 positions, blocks of 64 and 4 kept, an
//! eighth of the dense products.
//!
//! A query block's own key block (the one holding its last query's key,
//! for a decode step too) is always kept, then the tiles the bias cuts (a
//! padding boundary, the ragged last block), latest first. With `keep` ≥
//! the number of key blocks the result is dense attention.
//!
//! Built from candle's differentiable ops (the choice of blocks is a
//! discrete, gradient-free step), so a model with it trains.

use candle_core::{DType, Tensor, D};

use crate::{Error, Result};

/// Bias entries at or below this are masked keys (the decoder writes −1e9).
const MASKED: f32 = -1e8;

/// Scaled dot-product attention over each query block's `keep` best key
/// blocks.
///
/// `offset` is the key index of query 0 (the cached length in a decoder),
/// so that query blocks line up with key blocks; give 0 when queries and
/// keys are the same sequence.
///
/// # Shapes
/// `q`: (B, h, T, d), `k`/`v`: (B, h, S, d), `bias` (0 = attend, ≤ −1e8 =
/// masked): (B or 1, 1, T, S) → (B, h, T, d)
pub fn block_top_k_attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    block: usize,
    keep: usize,
    offset: usize,
) -> Result<Tensor> {
    if block == 0 || keep == 0 {
        return Err(Error::Invalid(format!(
            "block top-k attention needs a block size ≥ 1 and ≥ 1 kept block, got {block} and {keep}"
        )));
    }
    let (b, h, t, d) = q.dims4()?;
    let (bk, hk, s, dk) = k.dims4()?;
    if (bk, hk, dk) != (b, h, d) || v.dims4()? != (b, h, s, d) {
        return Err(Error::Invalid(format!(
            "block top-k attention: q {:?}, k {:?}, v {:?} do not fit (B, h, T, d) / (B, h, S, d)",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    let dev = q.device();
    // Query blocks line up with key blocks: pad `lead` rows in front so
    // that query i sits in the row of key offset + i. One query (a decode
    // step) is its own block.
    let qb = if t == 1 { 1 } else { block };
    let lead = if t == 1 { 0 } else { offset % block };
    let nq = (lead + t).div_ceil(qb);
    let nk = s.div_ceil(block);
    let keep = keep.min(nk);
    let (tp, sp) = (nq * qb, nk * block);

    let bias = match bias {
        Some(x) => x.broadcast_as((b, 1, t, s))?.to_dtype(DType::F32)?,
        None => Tensor::zeros((b, 1, t, s), DType::F32, dev)?,
    };
    // Padded keys and padded query rows are masked (finite: a padded row
    // softmaxes to uniform weights and is thrown away), so they cut no tile.
    let masked = |rows: usize, cols: usize| Tensor::full(-1e9f32, (b, 1, rows, cols), dev);
    let bias = Tensor::cat(&[&masked(lead, s)?, &bias, &masked(tp - t - lead, s)?], 2)?;
    let bias = Tensor::cat(&[&bias, &masked(tp, sp - s)?], 3)?.contiguous()?;
    let q = q.pad_with_zeros(2, lead, tp - t - lead)?;
    let (k, v) = (
        k.pad_with_zeros(2, 0, sp - s)?,
        v.pad_with_zeros(2, 0, sp - s)?,
    );

    // Block scores: for each query, an upper bound on its dot product with
    // any key of the block (Quest): Σ_c max(q_c·min_c, q_c·max_c) over the
    // block's channel-wise key minima and maxima, which is
    // relu(q)·max + min(q, 0)·min: two matmuls. A query block takes, per
    // key block, its best query's bound, so one query that needs a block
    // gets it however many others in its block do not. (Padded keys of the
    // ragged last block are zeros: they only loosen its bound.)
    let kb = k.detach().reshape((b * h, nk, block, d))?;
    let (k_max, k_min) = (kb.max(2)?.t()?, kb.min(2)?.t()?);
    let qr = q.detach().reshape((b * h, tp, d))?;
    let bound = (qr.relu()?.matmul(&k_max)? + qr.minimum(0f32)?.matmul(&k_min)?)?;
    // Padded query rows (zeros) would bound every block at 0: left out.
    let rows: Vec<f32> = (0..tp)
        .map(|r| {
            if (lead..lead + t).contains(&r) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    let scores = bound
        .broadcast_add(&Tensor::from_vec(rows, (1, tp, 1), dev)?)?
        .reshape((b * h, nq, qb, nk))?
        .max(2)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    // Per tile: visible at all (max above MASKED) and cut by the bias
    // (min at or below MASKED).
    let tiles = bias
        .detach()
        .reshape((b, nq, qb, nk, block))?
        .permute((0, 1, 3, 2, 4))?
        .reshape((b, nq, nk, qb * block))?;
    let tile_max = tiles.max(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
    let tile_min = tiles.min(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;

    // Each query block's own key block: the one holding its last query's
    // key (a decode step's too, so that cached decoding keeps the local
    // block as the prompt's prefill does).
    let own: Vec<usize> = (0..nq)
        .map(|i| ((offset + (i + 1) * qb - lead - 1) / block).min(nk - 1))
        .collect();
    let chosen = choose_blocks(&scores, &tile_max, &tile_min, &own, (b, h, nq, nk), keep);
    // Gather the chosen key/value blocks and bias tiles.
    let kv_index: Vec<u32> = chosen
        .iter()
        .enumerate()
        .map(|(n, &j)| ((n / (nq * keep)) * nk + j) as u32) // n / (nq·keep) = batch·h + head
        .collect();
    let bias_index: Vec<u32> = chosen
        .iter()
        .enumerate()
        .map(|(n, &j)| {
            let (row, i) = (n / (h * nq * keep), (n / keep) % nq); // batch row, query block
            ((row * nq + i) * nk + j) as u32
        })
        .collect();
    let kv_index = Tensor::from_vec(kv_index, chosen.len(), dev)?;
    let bias_index = Tensor::from_vec(bias_index, chosen.len(), dev)?;
    let gather = |x: &Tensor| -> Result<Tensor> {
        Ok(x.reshape((b * h * nk, block * d))?
            .index_select(&kv_index, 0)?
            .reshape((b * h, nq, keep * block, d))?)
    };
    let (k, v) = (gather(&k)?, gather(&v)?);
    let bias = tiles
        .reshape((b * nq * nk, qb * block))?
        .index_select(&bias_index, 0)?
        .reshape((b, h, nq, keep, qb, block))?
        .permute((0, 1, 2, 4, 3, 5))?
        .reshape((b * h, nq, qb, keep * block))?;

    // (candle's CPU matmul batches over at most two leading dims.)
    let q = q.reshape((b * h, nq, qb, d))?;
    let scores = ((q.matmul(&k.t()?)? * (d as f64).powf(-0.5))? + bias)?;
    let probs = crate::ops::softmax_last_dim(&scores)?;
    Ok(probs
        .matmul(&v)?
        .reshape((b, h, tp, d))?
        .narrow(2, lead, t)?)
}

/// For each (batch, head, query block), the `keep` key blocks to attend,
/// in the order chosen: first its own block (`own[i]`) when visible, then
/// the tiles the bias cuts (latest first), then visible blocks by score,
/// then masked ones (their bias hides them).
///
/// `scores`: (B, h, nq, nk) row-major; `tile_max`/`tile_min`: (B, nq, nk).
fn choose_blocks(
    scores: &[f32],
    tile_max: &[f32],
    tile_min: &[f32],
    own: &[usize],
    (b, h, nq, nk): (usize, usize, usize, usize),
    keep: usize,
) -> Vec<usize> {
    let mut out = Vec::with_capacity(b * h * nq * keep);
    let mut order: Vec<usize> = Vec::with_capacity(nk);
    for row in 0..b {
        for head in 0..h {
            for i in 0..nq {
                let tile = (row * nq + i) * nk;
                let score = &scores[((row * h + head) * nq + i) * nk..][..nk];
                // 3 = its own block, 2 = cut by the bias, 1 = fully visible,
                // 0 = fully masked.
                let rank =
                    |j: usize| match (tile_max[tile + j] > MASKED, tile_min[tile + j] > MASKED) {
                        (true, _) if j == own[i] => 3,
                        (true, false) => 2,
                        (true, true) => 1,
                        _ => 0,
                    };
                order.clear();
                order.extend(0..nk);
                order.sort_by(|&x, &y| {
                    rank(y).cmp(&rank(x)).then_with(|| {
                        if rank(x) >= 2 {
                            y.cmp(&x)
                        } else {
                            score[y].total_cmp(&score[x])
                        }
                    })
                });
                out.extend_from_slice(&order[..keep]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::attention::attend;
    use crate::fusion::test_util::{max_diff, rand};
    use candle_core::{Device, Var};

    /// A causal bias (0 / −1e9) for `t` queries after `past` cached keys,
    /// with the first `pad` keys of the batch's second row masked.
    fn causal(b: usize, t: usize, past: usize, pad: usize) -> Tensor {
        let s = past + t;
        let v: Vec<f32> = (0..b * t * s)
            .map(|n| {
                let (row, i, j) = (n / (t * s), (n / s) % t, n % s);
                if j > past + i || (row == 1 && j < pad) {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(v, (b, 1, t, s), &Device::Cpu).unwrap()
    }

    #[test]
    fn keeping_every_block_is_dense_attention() {
        // Ragged sizes: 23 queries after 6 cached keys, blocks of 4 (lead
        // padding 2, a ragged last block), padding in one row.
        let (b, h, t, past, d) = (2, 3, 23, 6, 8);
        let s = past + t;
        let q = rand(&[b, h, t, d], 1);
        let k = rand(&[b, h, s, d], 2);
        let v = rand(&[b, h, s, d], 3);
        let bias = causal(b, t, past, 5);
        let dense = attend(&q, &k, &v, Some(&bias), None).unwrap();
        for keep in [s.div_ceil(4), 100] {
            let sparse = block_top_k_attend(&q, &k, &v, Some(&bias), 4, keep, past).unwrap();
            assert!(max_diff(&sparse, &dense) < 1e-5, "keep {keep}");
        }
        // No bias (an encoder): the same.
        let dense = attend(&q, &k, &v, None, None).unwrap();
        let sparse = block_top_k_attend(&q, &k, &v, None, 5, 6, 0).unwrap();
        assert!(max_diff(&sparse, &dense) < 1e-5);
    }

    #[test]
    fn fewer_blocks_equal_dense_attention_masked_to_the_chosen_blocks() {
        // Reference: choose the blocks in plain loops, then run dense
        // attention with every other key masked.
        let (b, h, t, d, block, keep) = (1, 2, 16, 4, 4, 2);
        let q = rand(&[b, h, t, d], 4);
        let k = rand(&[b, h, t, d], 5);
        let v = rand(&[b, h, t, d], 6);
        let bias = causal(b, t, 0, 0);
        let sparse = block_top_k_attend(&q, &k, &v, Some(&bias), block, keep, 0).unwrap();
        let qv: Vec<Vec<Vec<f32>>> = q.squeeze(0).unwrap().to_vec3().unwrap();
        let kv: Vec<Vec<Vec<f32>>> = k.squeeze(0).unwrap().to_vec3().unwrap();
        let n = t / block;
        let mut mask = vec![-1e9f32; h * t * t];
        for head in 0..h {
            for i in 0..n {
                // The block's best query's bound on its dot product with
                // any key of block j.
                let dot = |j: usize| -> f32 {
                    (0..block)
                        .map(|r| {
                            let q = &qv[head][i * block + r];
                            (0..d)
                                .map(|c| {
                                    let ks = (0..block).map(|x| kv[head][j * block + x][c]);
                                    let lo = ks.clone().fold(f32::INFINITY, f32::min);
                                    let hi = ks.fold(f32::NEG_INFINITY, f32::max);
                                    (q[c] * lo).max(q[c] * hi)
                                })
                                .sum::<f32>()
                        })
                        .fold(f32::NEG_INFINITY, f32::max)
                };
                // The diagonal block, then the best earlier one.
                let mut blocks = vec![i];
                if let Some(best) = (0..i).max_by(|&x, &y| dot(x).total_cmp(&dot(y))) {
                    blocks.push(best);
                }
                for r in 0..block {
                    let qi = i * block + r;
                    for &j in &blocks {
                        for c in 0..block {
                            let kj = j * block + c;
                            if kj <= qi {
                                mask[(head * t + qi) * t + kj] = 0.0;
                            }
                        }
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (1, h, t, t), &Device::Cpu).unwrap();
        let reference = attend(&q, &k, &v, Some(&mask), None).unwrap();
        assert!(max_diff(&sparse, &reference) < 1e-5);
        // And it is not dense: the blocks left out change the result.
        let dense = attend(&q, &k, &v, Some(&bias), None).unwrap();
        assert!(max_diff(&sparse, &dense) > 1e-3);
    }

    /// A decode step's query (seeded by `seed`), `s` cached noise keys
    /// (seed + 1) whose block `hit` is replaced by 4 × the query, and
    /// values that are the keys' indices.
    fn one_matching_block(
        s: usize,
        d: usize,
        block: usize,
        hit: usize,
        seed: u64,
    ) -> (Tensor, Tensor, Tensor) {
        let q = rand(&[1, 1, 1, d], seed);
        let rows = (q.clone() * 4.0).unwrap().repeat((1, 1, block, 1)).unwrap();
        let k = rand(&[1, 1, s, d], seed + 1)
            .slice_assign(&[0..1, 0..1, hit * block..(hit + 1) * block, 0..d], &rows)
            .unwrap();
        let v = Tensor::arange(0f32, s as f32, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, s, 1))
            .unwrap()
            .repeat((1, 1, 1, d))
            .unwrap();
        (q, k, v)
    }

    /// What the decode step after all of `k` reads, keeping `keep` blocks.
    fn read(q: &Tensor, k: &Tensor, v: &Tensor, block: usize, keep: usize) -> f32 {
        let s = k.dim(2).unwrap();
        block_top_k_attend(q, k, v, None, block, keep, s - 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn a_decode_step_finds_the_block_that_matches_its_query() {
        // 64 cached keys in 8 blocks; one block's keys all equal the query
        // (scaled up), the rest are noise. With one block kept beside the
        // ragged latest one, the query reads that block's values.
        let (s, d, block, hit) = (66, 8, 8, 3);
        let (q, k, v) = one_matching_block(s, d, block, hit, 7);
        let got = read(&q, &k, &v, block, 2);
        // Values are key indices: the answer lies in the matching block.
        assert!(
            (hit * block) as f32 <= got && got < ((hit + 1) * block) as f32,
            "read {got}, expected a value of block {hit}"
        );
    }

    #[test]
    fn a_decode_step_keeps_its_own_block() {
        // 64 cached keys fill 8 blocks exactly; block 3 matches the query
        // best, but with one block kept the step reads its own (the last).
        let (s, d, block) = (64, 8, 8);
        let (q, k, v) = one_matching_block(s, d, block, 3, 13);
        let read = |keep: usize| read(&q, &k, &v, block, keep);
        let own = read(1);
        assert!((56.0..64.0).contains(&own), "read {own}");
        // With two, the best-matching block joins it and dominates.
        let two = read(2);
        assert!(two < 40.0, "read {two}");
    }

    /// A prompt's block read by one query among filler: key 0 matches the
    /// last block's first query (a needle), keys 4–11 match its other
    /// three queries weakly (filler). Summed queries would pick a filler
    /// block; the block's best query picks the needle's.
    #[test]
    fn one_query_of_a_block_finds_its_needle_among_filler() {
        let (t, d, block) = (16, 4, 4);
        let e = |i: usize, x: f32| -> Vec<f32> {
            (0..d).map(|c| if c == i { x } else { 0.0 }).collect()
        };
        let keys: Vec<f32> = (0..t)
            .flat_map(|j| match j {
                0 => e(0, 4.0),
                1..=3 => e(2, 0.1),
                4..=11 => e(1, 1.0),
                _ => e(3, 1.0),
            })
            .collect();
        let queries: Vec<f32> = (0..t)
            .flat_map(|i| if i == 12 { e(0, 1.0) } else { e(1, 1.0) })
            .collect();
        let dev = Device::Cpu;
        let q = Tensor::from_vec(queries, (1, 1, t, d), &dev).unwrap();
        let k = Tensor::from_vec(keys, (1, 1, t, d), &dev).unwrap();
        // Values: each key's index.
        let v = Tensor::arange(0f32, t as f32, &dev)
            .unwrap()
            .reshape((1, 1, t, 1))
            .unwrap()
            .repeat((1, 1, 1, d))
            .unwrap();
        let bias = causal(1, t, 0, 0);
        let out = block_top_k_attend(&q, &k, &v, Some(&bias), block, 2, 0).unwrap();
        let needle = out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[12 * d];
        // Block 0 and its own key 12: about 0.65 of the weight on key 0
        // (1.6); a filler block instead gives the mean of 4–7 and 12 (6.8).
        assert!(needle < 3.0, "the needle query read {needle}");
    }

    #[test]
    fn gradients_reach_the_queries_and_keys() {
        let q = Var::from_tensor(&rand(&[1, 2, 12, 4], 9)).unwrap();
        let k = Var::from_tensor(&rand(&[1, 2, 12, 4], 10)).unwrap();
        let v = rand(&[1, 2, 12, 4], 11);
        let bias = causal(1, 12, 0, 0);
        let y = block_top_k_attend(q.as_tensor(), k.as_tensor(), &v, Some(&bias), 4, 2, 0).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, x) in [("q", &q), ("k", &k)] {
            let n: f32 = g
                .get(x.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reaches {name}"))
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(n > 0.0, "{name}");
        }
    }

    #[test]
    fn zero_block_or_keep_is_refused() {
        let q = rand(&[1, 1, 4, 2], 12);
        for (block, keep) in [(0, 1), (2, 0)] {
            let e = block_top_k_attend(&q, &q, &q, None, block, keep, 0).unwrap_err();
            assert!(e.to_string().contains("block"), "{e}");
        }
    }
}

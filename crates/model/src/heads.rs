//! The step's queries, keys and values as the attention layer works on them: the projections'
//! output rows (one fused buffer with q, k and v side by side, or three), rewritten in place
//! by hooks, q/k norms, clamps and rotary embeddings, then read by the KV cache and attention
//! through row strides ([`Rows`]). Nothing between the projection and the cache copies them
//! (before: a split of the fused output, a copy per rotation, a copy into plain vectors). A
//! hook that someone asked for sees a `[n, heads, head_dim]` tensor made from the rows and may
//! hand back a replacement, which is written over them: the copy is paid only then.

use crate::batch::Rows;
use crate::error::{ModelError, Result};
use crate::forward::ForwardCtx;
use crate::layers::Norm;
use candle_core::{Device, Tensor};
use glassbox_protocol::HookName;

/// Elements per piece of the in-place passes that go to the compute pool (a decode step's
/// rows stay on the calling thread).
const PAR_MIN: usize = 16 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Q,
    K,
    V,
}

/// Where one part lives: which buffer, its rows' stride, its first column and its heads.
#[derive(Clone, Copy, Debug)]
struct Place {
    buf: usize,
    stride: usize,
    col: usize,
    heads: usize,
}

pub struct QkvRows {
    bufs: Vec<Vec<f32>>,
    n: usize,
    head_dim: usize,
    places: [Place; 3],
}

impl QkvRows {
    /// A fused projection's `n` rows: `h` query heads, then `kvh` key and `kvh` value heads.
    pub fn fused(y: Vec<f32>, n: usize, (h, kvh, dh): (usize, usize, usize)) -> Result<QkvRows> {
        let stride = (h + 2 * kvh) * dh;
        let place = |col: usize, heads: usize| Place { buf: 0, stride, col, heads };
        QkvRows { bufs: vec![y], n, head_dim: dh, places: [place(0, h), place(h * dh, kvh), place((h + kvh) * dh, kvh)] }.checked()
    }

    /// Three projections' rows, each in a buffer of its own.
    pub fn split(q: Vec<f32>, k: Vec<f32>, v: Vec<f32>, n: usize, (h, kvh, dh): (usize, usize, usize)) -> Result<QkvRows> {
        let place = |buf: usize, heads: usize| Place { buf, stride: heads * dh, col: 0, heads };
        QkvRows { bufs: vec![q, k, v], n, head_dim: dh, places: [place(0, h), place(1, kvh), place(2, kvh)] }.checked()
    }

    fn checked(self) -> Result<QkvRows> {
        let fits = self.places.iter().all(|p| self.bufs[p.buf].len() == self.n * p.stride && p.col + p.heads * self.head_dim <= p.stride);
        if !fits {
            let lens: Vec<usize> = self.bufs.iter().map(Vec::len).collect();
            return Err(ModelError::BadConfig(format!("q/k/v projections of {lens:?} values for {} rows of {:?} heads", self.n, self.places.map(|p| p.heads))));
        }
        Ok(self)
    }

    fn place(&self, p: Part) -> Place {
        self.places[p as usize]
    }

    /// Part `p` of every row, `heads * head_dim` values each.
    pub fn rows(&self, p: Part) -> Rows<'_> {
        let pl = self.place(p);
        Rows::columns(&self.bufs[pl.buf], pl.stride, pl.col..pl.col + pl.heads * self.head_dim)
    }

    /// `f(row, values)` over part `p` of every row, in place; rows on the pool when many.
    pub fn for_each_row(&mut self, p: Part, f: impl Fn(usize, &mut [f32]) + Sync) {
        let pl = self.place(p);
        let width = pl.heads * self.head_dim;
        crate::pool::for_each_rows(&mut self.bufs[pl.buf], pl.stride, PAR_MIN, |first, piece| {
            for (i, row) in piece.chunks_exact_mut(pl.stride).enumerate() {
                f(first + i, &mut row[pl.col..pl.col + width]);
            }
        });
    }

    /// Part `p` as a `[n, heads, head_dim]` tensor (a copy).
    pub fn tensor(&self, p: Part) -> Result<Tensor> {
        let rows = self.rows(p);
        let mut v = Vec::with_capacity(self.n * rows.width());
        for i in 0..rows.len() {
            v.extend_from_slice(rows.row(i));
        }
        Ok(Tensor::from_vec(v, (self.n, self.place(p).heads, self.head_dim), &Device::Cpu)?)
    }

    /// Write `t` (`[n, heads, head_dim]` or the same values flat per row) over part `p`.
    pub fn replace(&mut self, p: Part, t: &Tensor) -> Result<()> {
        let width = self.place(p).heads * self.head_dim;
        if t.elem_count() != self.n * width {
            return Err(ModelError::BadConfig(format!("a replacement of shape {:?} for {} rows of {width} values", t.dims(), self.n)));
        }
        let v = crate::weights::to_vec(t)?;
        self.for_each_row(p, |i, row| row.copy_from_slice(&v[i * width..(i + 1) * width]));
        Ok(())
    }

    /// The hook `name` over part `p`: only when someone asked, a tensor of the rows for the
    /// handler, and its replacement, if any, written back.
    pub fn hook(&mut self, ctx: &mut ForwardCtx, name: HookName, p: Part) -> Result<()> {
        if !ctx.wants(name) {
            return Ok(());
        }
        let t = self.tensor(p)?;
        if let Some(r) = ctx.hook_replace(name, t)? {
            if r.dims() != [self.n, self.place(p).heads, self.head_dim] {
                return Err(ModelError::BadConfig(format!("hook {name} replaced a {:?} activation with one of shape {:?}", [self.n, self.place(p).heads, self.head_dim], r.dims())));
            }
            self.replace(p, &r)?;
        }
        Ok(())
    }

    /// Normalize part `p` in pieces of `width` values (one head, or OLMoE's whole projection).
    pub fn norm(&mut self, p: Part, norm: &Norm, width: usize) -> Result<()> {
        match norm {
            Norm::Rms(n) => {
                self.for_each_row(p, |_, row| {
                    for piece in row.chunks_exact_mut(width.max(1)) {
                        n.normalize_in_place(piece);
                    }
                });
                Ok(())
            }
            // No architecture here norms q and k with a LayerNorm; through tensors if one does.
            Norm::Layer { .. } => {
                let t = self.tensor(p)?;
                let dims = t.dims3()?;
                let normed = norm.forward(&t.reshape((dims.0 * dims.1 * dims.2 / width.max(1), width))?)?;
                self.replace(p, &normed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::data;

    /// A fused buffer and three buffers give the same parts; in-place passes touch only
    /// their part; a replacement lands where the tensor came from.
    #[test]
    fn parts_of_fused_and_split_rows() {
        let (n, h, kvh, dh) = (3, 4, 2, 8);
        let (qw, kw) = (h * dh, kvh * dh);
        let y = data(n * (qw + 2 * kw), 1);
        let fused = QkvRows::fused(y.clone(), n, (h, kvh, dh)).unwrap();
        let cols = |r: usize, c0: usize, w: usize| y[r * (qw + 2 * kw) + c0..r * (qw + 2 * kw) + c0 + w].to_vec();
        let part = |c0: usize, w: usize| (0..n).flat_map(|r| cols(r, c0, w)).collect::<Vec<f32>>();
        let (q, k, v) = (part(0, qw), part(qw, kw), part(qw + kw, kw));
        let mut split = QkvRows::split(q.clone(), k.clone(), v.clone(), n, (h, kvh, dh)).unwrap();
        for (p, want) in [(Part::Q, &q), (Part::K, &k), (Part::V, &v)] {
            for rows in [fused.rows(p), split.rows(p)] {
                let got: Vec<f32> = (0..rows.len()).flat_map(|i| rows.row(i).to_vec()).collect();
                assert_eq!(&got, want, "{p:?}");
            }
        }
        let mut fused = fused;
        for qkv in [&mut fused, &mut split] {
            qkv.for_each_row(Part::K, |i, row| row.iter_mut().for_each(|x| *x = i as f32));
            let t = qkv.tensor(Part::K).unwrap();
            assert_eq!(t.dims(), [n, kvh, dh]);
            assert_eq!(crate::weights::to_vec(&t).unwrap(), (0..n).flat_map(|i| vec![i as f32; kw]).collect::<Vec<_>>());
            let r = (t + 1.0).unwrap();
            qkv.replace(Part::K, &r).unwrap();
            assert_eq!(crate::weights::to_vec(&qkv.tensor(Part::K).unwrap()).unwrap(), crate::weights::to_vec(&r).unwrap());
            assert_eq!(crate::weights::to_vec(&qkv.tensor(Part::V).unwrap()).unwrap(), v, "v untouched");
            assert!(qkv.replace(Part::V, &Tensor::zeros(5, candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
        }
        assert!(QkvRows::fused(vec![0.0; 7], n, (h, kvh, dh)).is_err());
    }
}

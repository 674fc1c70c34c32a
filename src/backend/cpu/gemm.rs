//! Matrix products through the `gemm` crate (runtime-dispatched AVX-512/AVX2/portable kernels).

use crate::backend::Elem;

/// `c[m,n] (+)= op(a)[m,k] · op(b)[k,n]` on row-major buffers.
///
/// `ta`: `a` is stored transposed, as `[k, m]`; `tb`: `b` is stored as `[n, k]`.
/// `accumulate` adds into `c` instead of overwriting it. `parallel` lets gemm use rayon threads;
/// pass false when the caller already parallelizes over samples.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    ta: bool,
    b: &[T],
    tb: bool,
    c: &mut [T],
    accumulate: bool,
    parallel: bool,
) {
    assert!(
        a.len() >= m * k && b.len() >= k * n && c.len() >= m * n,
        "matmul: buffer too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].iter_mut().for_each(|v| *v = T::zero());
        }
        return;
    }
    let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
    let par = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the bounds above guarantee every index the strides reach lies inside the slices,
    // and `c` does not alias `a` or `b` (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: bool, b: &[f64], tb: bool) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    c[i * n + j] += av * bv;
                }
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_in_every_transpose() {
        let (m, n, k) = (7, 5, 11);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 37 % 17) as f64) - 8.0).collect();
        let b: Vec<f64> = (0..k * n).map(|i| ((i * 29 % 13) as f64) - 6.0).collect();
        for ta in [false, true] {
            for tb in [false, true] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, &a, ta, &b, tb, &mut c, false, false);
                assert_eq!(c, want, "ta={ta} tb={tb}");
                matmul(m, n, k, &a, ta, &b, tb, &mut c, true, true);
                let twice: Vec<f64> = want.iter().map(|v| 2.0 * v).collect();
                assert_eq!(c, twice, "accumulate ta={ta} tb={tb}");
            }
        }
    }
}

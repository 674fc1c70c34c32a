//! A minimal f32 vector abstraction over AVX-512F, AVX2+FMA and a portable fallback.
//!
//! Kernels are written once, generic over `V: Vf` and `#[inline(always)]`; `simd_fn!` makes a
//! dispatching entry point that instantiates them inside `#[target_feature]` functions, so the
//! intrinsics inline into code compiled for that ISA. The ISA is detected once at run time
//! (`Isa::detect`); `GHOSTV3_ISA=portable|avx2|avx512` forces a lower one (tests use that to run
//! the fallback on machines that have AVX-512).
//!
//! Every `Vf` method is unsafe for the same reason (documented once on the trait), so clippy's
//! per-method safety-doc lint is silenced here.
#![allow(clippy::missing_safety_doc)]

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    Avx2,
    Avx512,
    /// 256-bit vectors on an AVX-512 CPU (32 registers). Zen 4 runs a 512-bit op as two 256-bit
    /// halves, so layers whose channel count leaves half a 512-bit vector empty (8, 24, 40, ...)
    /// run faster in 256-bit lanes; the engine picks this per layer.
    Avx512Ymm,
}

impl Isa {
    /// The best ISA this CPU supports, capped by `GHOSTV3_ISA` when set.
    pub fn detect() -> Isa {
        let best = Self::best();
        match std::env::var("GHOSTV3_ISA").ok().as_deref() {
            Some("portable") => Isa::Portable,
            Some("avx2") if best != Isa::Portable => Isa::Avx2,
            _ => best,
        }
    }

    /// Every ISA this CPU can run, lowest first (for tests).
    pub fn available() -> Vec<Isa> {
        let best = Self::best();
        let mut v: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i as u8 <= best as u8)
            .collect();
        if best == Isa::Avx512 && Self::has_avx512vl() {
            v.push(Isa::Avx512Ymm);
        }
        v
    }

    fn has_avx512vl() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx512vl")
                && std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// 256-bit lanes inside AVX-512VL code where available, else `self`.
    pub fn narrow(self) -> Isa {
        if self == Isa::Avx512 && Self::has_avx512vl() {
            Isa::Avx512Ymm
        } else {
            self
        }
    }

    /// The ISA for a layer of `channels` vector-dimension width on an engine running `self`.
    pub fn for_channels(self, channels: usize) -> Isa {
        if self == Isa::Avx512 && (1..=8).contains(&(channels % 16)) && Self::has_avx512vl() {
            Isa::Avx512Ymm
        } else {
            self
        }
    }

    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// f32 lanes of one vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable | Isa::Avx512Ymm => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512f",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512Ymm => "avx512vl-256",
            Isa::Portable => "portable",
        }
    }
}

/// One f32 vector of `L` lanes. All methods are unsafe: pointers must be valid for `L` floats
/// (or `n` for the `_n` variants) and the ISA must be available.
pub trait Vf: Copy {
    const L: usize;
    /// Vector registers of the ISA (sizes the register tiles).
    const REGS: usize = 16;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// Stores the first `n` lanes (n <= L).
    unsafe fn store_n(self, p: *mut f32, n: usize);
    /// Loads the first `n` lanes, the rest zero (n <= L).
    unsafe fn load_n(p: *const f32, n: usize) -> Self;
    /// a * b + c
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn mul(a: Self, b: Self) -> Self;
    unsafe fn div(a: Self, b: Self) -> Self;
    unsafe fn max(a: Self, b: Self) -> Self;
    unsafe fn min(a: Self, b: Self) -> Self;
}

/// Portable fallback: 8 lanes in a plain array (the compiler's baseline SIMD at best).
#[derive(Clone, Copy)]
pub struct Portable([f32; 8]);

impl Vf for Portable {
    const L: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 8])
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Portable([v; 8])
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Portable(std::ptr::read_unaligned(p as *const [f32; 8]))
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        std::ptr::write_unaligned(p as *mut [f32; 8], self.0)
    }
    #[inline(always)]
    unsafe fn store_n(self, p: *mut f32, n: usize) {
        for i in 0..n {
            *p.add(i) = self.0[i];
        }
    }
    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> Self {
        let mut a = [0.0; 8];
        for (i, v) in a.iter_mut().enumerate().take(n) {
            *v = *p.add(i);
        }
        Portable(a)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        let mut r = c.0;
        for ((r, a), b) in r.iter_mut().zip(a.0).zip(b.0) {
            *r += a * b;
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        let mut r = a.0;
        for (r, b) in r.iter_mut().zip(b.0) {
            *r += b;
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn mul(a: Self, b: Self) -> Self {
        let mut r = a.0;
        for (r, b) in r.iter_mut().zip(b.0) {
            *r *= b;
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn div(a: Self, b: Self) -> Self {
        let mut r = a.0;
        for (r, b) in r.iter_mut().zip(b.0) {
            *r /= b;
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn max(a: Self, b: Self) -> Self {
        let mut r = a.0;
        for (r, b) in r.iter_mut().zip(b.0) {
            *r = r.max(b);
        }
        Portable(r)
    }
    #[inline(always)]
    unsafe fn min(a: Self, b: Self) -> Self {
        let mut r = a.0;
        for (r, b) in r.iter_mut().zip(b.0) {
            *r = r.min(b);
        }
        Portable(r)
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512, Ymm32};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vf;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Vf for Avx512 {
        const L: usize = 16;
        const REGS: usize = 32;
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            Avx512(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Avx512(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn store_n(self, p: *mut f32, n: usize) {
            _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, self.0)
        }
        #[inline(always)]
        unsafe fn load_n(p: *const f32, n: usize) -> Self {
            Avx512(_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p))
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx512(_mm512_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            Avx512(_mm512_mul_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn div(a: Self, b: Self) -> Self {
            Avx512(_mm512_div_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn max(a: Self, b: Self) -> Self {
            Avx512(_mm512_max_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn min(a: Self, b: Self) -> Self {
            Avx512(_mm512_min_ps(a.0, b.0))
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256);

    const MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

    #[inline(always)]
    unsafe fn mask8(n: usize) -> __m256i {
        _mm256_loadu_si256(MASKS.as_ptr().add(8 - n) as *const __m256i)
    }

    /// The same `Vf` over 256-bit registers for AVX2 (16 registers) and for 256-bit lanes
    /// inside AVX-512VL code (32 registers): only the register count differs.
    macro_rules! impl_vf_m256 {
        ($t:ident, $regs:expr) => {
            impl Vf for $t {
                const REGS: usize = $regs;
                const L: usize = 8;
                #[inline(always)]
                unsafe fn zero() -> Self {
                    $t(_mm256_setzero_ps())
                }
                #[inline(always)]
                unsafe fn splat(v: f32) -> Self {
                    $t(_mm256_set1_ps(v))
                }
                #[inline(always)]
                unsafe fn load(p: *const f32) -> Self {
                    $t(_mm256_loadu_ps(p))
                }
                #[inline(always)]
                unsafe fn store(self, p: *mut f32) {
                    _mm256_storeu_ps(p, self.0)
                }
                #[inline(always)]
                unsafe fn store_n(self, p: *mut f32, n: usize) {
                    _mm256_maskstore_ps(p, mask8(n), self.0)
                }
                #[inline(always)]
                unsafe fn load_n(p: *const f32, n: usize) -> Self {
                    $t(_mm256_maskload_ps(p, mask8(n)))
                }
                #[inline(always)]
                unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
                    $t(_mm256_fmadd_ps(a.0, b.0, c.0))
                }
                #[inline(always)]
                unsafe fn add(a: Self, b: Self) -> Self {
                    $t(_mm256_add_ps(a.0, b.0))
                }
                #[inline(always)]
                unsafe fn mul(a: Self, b: Self) -> Self {
                    $t(_mm256_mul_ps(a.0, b.0))
                }
                #[inline(always)]
                unsafe fn div(a: Self, b: Self) -> Self {
                    $t(_mm256_div_ps(a.0, b.0))
                }
                #[inline(always)]
                unsafe fn max(a: Self, b: Self) -> Self {
                    $t(_mm256_max_ps(a.0, b.0))
                }
                #[inline(always)]
                unsafe fn min(a: Self, b: Self) -> Self {
                    $t(_mm256_min_ps(a.0, b.0))
                }
            }
        };
    }

    impl_vf_m256!(Avx2, 16);

    /// 256-bit vectors used inside AVX-512VL code (32 registers).
    #[derive(Clone, Copy)]
    pub struct Ymm32(__m256);

    impl_vf_m256!(Ymm32, 32);
}

/// Defines `pub fn $name(isa: Isa, args...)` that runs the generic `unsafe fn $generic<V>(args...)`
/// instantiated for the given ISA inside a matching `#[target_feature]` function.
macro_rules! simd_fn {
    ($vis:vis fn $name:ident => $generic:ident ( $($a:ident : $t:ty),* $(,)? )) => {
        /// # Safety
        /// The pointers in the arguments must be valid as the generic kernel documents, and
        /// `isa` must be supported by this CPU (`Isa::detect`/`Isa::available`).
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name(isa: $crate::infer::simd::Isa, $($a: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn a512($($a: $t),*) { $generic::<$crate::infer::simd::Avx512>($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn a2($($a: $t),*) { $generic::<$crate::infer::simd::Avx2>($($a),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn y32($($a: $t),*) { $generic::<$crate::infer::simd::Ymm32>($($a),*) }
            match isa {
                #[cfg(target_arch = "x86_64")]
                $crate::infer::simd::Isa::Avx512 => a512($($a),*),
                #[cfg(target_arch = "x86_64")]
                $crate::infer::simd::Isa::Avx2 => a2($($a),*),
                #[cfg(target_arch = "x86_64")]
                $crate::infer::simd::Isa::Avx512Ymm => y32($($a),*),
                _ => $generic::<$crate::infer::simd::Portable>($($a),*),
            }
        }
    };
}
pub(crate) use simd_fn;
